# Decide whether to build the CUDA kernels. Never from torch.cuda.is_available():
# build hosts usually have no GPU. Included before find_package(Torch); call
# liftplace_cuda_after_torch() right after it.
set(LIFTPLACE_WITH_CUDA OFF)

macro(liftplace_cuda_after_torch)
endmacro()

include(CheckLanguage)
if(NOT TORCH_HAS_CUDA)
  if(LIFTPLACE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LIFTPLACE_CUDA=ON but the installed torch is a CPU build. "
                        "Install a CUDA build of torch or use LIFTPLACE_CUDA=OFF.")
  endif()
  message(STATUS "liftplace: torch has no CUDA; building CPU kernels only")
  return()
endif()

# A CUDA build of torch needs the toolkit even to configure (its CMake config enables CUDA
# and looks for the libraries), so the steps below run for LIFTPLACE_CUDA=OFF too; OFF only
# leaves the .cu files out.
# nvcc from CUDACXX, else CUDA_HOME / CUDA_PATH, else PATH (CMake's own search).
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}")
    if(_root AND EXISTS "${_root}/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "${_root}/bin/nvcc")
      break()
    endif()
  endforeach()
endif()
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(LIFTPLACE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LIFTPLACE_CUDA=ON but no CUDA compiler (nvcc) was found. "
                        "Put nvcc on PATH or set CUDACXX / CUDA_HOME.")
  endif()
  message(FATAL_ERROR "The installed torch is a CUDA build, and its CMake config needs the CUDA toolkit "
                      "(nvcc) even for a CPU-only liftplace build, but no nvcc was found. Put nvcc on PATH "
                      "or set CUDACXX / CUDA_HOME, or install a CPU build of torch.")
endif()

# CMake before 3.25.2 cannot ask nvcc for C++20 ("Target _C requires the language dialect
# CUDA20 ... the compiler NVIDIA does not support this"), which torch 2.14's headers need.
if(CMAKE_CXX_STANDARD GREATER_EQUAL 20 AND CMAKE_VERSION VERSION_LESS 3.25.2)
  message(FATAL_ERROR "CMake ${CMAKE_VERSION} (${CMAKE_COMMAND}) cannot compile CUDA as C++20, which torch "
                      "${_torch_version}'s headers need; CMake 3.25.2 or newer is required (pyproject.toml asks "
                      "for >= 3.26). Install one into this environment with: pip install cmake")
endif()
enable_language(CUDA)
if(NOT LIFTPLACE_CUDA STREQUAL "OFF")
  set(LIFTPLACE_WITH_CUDA ON)
endif()
set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

# The newest listed architecture also gets PTX so newer GPUs can JIT it.
set(LIFTPLACE_CUDA_ARCHITECTURES "")
set(_liftplace_torch_arch_list "")
list(LENGTH LIFTPLACE_CUDA_ARCH _n)
if(_n EQUAL 0)
  message(FATAL_ERROR "LIFTPLACE_CUDA_ARCH is empty; give compute capabilities such as 80;86;89;90")
endif()
math(EXPR _last "${_n} - 1")
foreach(_i RANGE ${_last})
  list(GET LIFTPLACE_CUDA_ARCH ${_i} _a)
  if(NOT _a MATCHES "^[0-9]+[0-9a-z]?$")
    message(FATAL_ERROR "LIFTPLACE_CUDA_ARCH entries are compute capabilities without a dot (80, 90, 90a), got '${_a}'")
  endif()
  if(_i EQUAL _last)
    list(APPEND LIFTPLACE_CUDA_ARCHITECTURES "${_a}-real" "${_a}-virtual")
  else()
    list(APPEND LIFTPLACE_CUDA_ARCHITECTURES "${_a}-real")
  endif()
  string(REGEX REPLACE "^([0-9]+)([0-9][a-z]?)$" "\\1.\\2" _dotted "${_a}")
  list(APPEND _liftplace_torch_arch_list "${_dotted}")
endforeach()
if(LIFTPLACE_WITH_CUDA)
  message(STATUS "liftplace: building CUDA kernels for ${LIFTPLACE_CUDA_ARCHITECTURES}")
else()
  message(STATUS "liftplace: LIFTPLACE_CUDA=OFF; building CPU kernels only")
endif()

# torch's CMake config (Caffe2/public/cuda.cmake) runs the legacy FindCUDA, which looks for
# the toolkit next to the first nvcc on PATH; a wrapper script there (such as a
# /usr/local/bin/nvcc that execs the real one) leads it to the wrong root. Hand it the
# root that nvcc itself reported to CMake.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit used by torch's CMake config")
endif()
if(NOT CUDAToolkit_ROOT)
  set(CUDAToolkit_ROOT "${CUDA_TOOLKIT_ROOT_DIR}")
endif()
# Without TORCH_CUDA_ARCH_LIST torch probes for a GPU (a try_run); with it, it only
# appends -gencode flags, which liftplace_cuda_after_torch() drops again in favour of the
# CUDA_ARCHITECTURES above.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "${_liftplace_torch_arch_list}")
endif()
set(_liftplace_cuda_flags "${CMAKE_CUDA_FLAGS}")
# torch warns about (and ignores) CMAKE_CUDA_ARCHITECTURES; the target property is set below.
unset(CMAKE_CUDA_ARCHITECTURES)
unset(CMAKE_CUDA_ARCHITECTURES CACHE)

macro(liftplace_cuda_after_torch)
  # torch appended its own -gencode list and flags to CMAKE_CUDA_FLAGS; keep ours only.
  set(CMAKE_CUDA_FLAGS "${_liftplace_cuda_flags}")
  set(CMAKE_CUDA_ARCHITECTURES ${LIFTPLACE_CUDA_ARCHITECTURES})
  # The kernels need torch, c10 and c10_cuda, not NVRTC; a toolkit without NVRTC (as when
  # it comes from pip wheels) leaves that entry NOTFOUND, which would stop generation.
  list(FILTER TORCH_LIBRARIES EXCLUDE REGEX "(NOTFOUND$)|nvrtc")
  # ATen's CUDA headers include cuBLAS / cuSPARSE headers, which pip installs of torch ship
  # in site-packages/nvidia/cu<major>/include; CMakeLists.txt searches there last
  # (-idirafter), so the toolkit's own CUDA runtime headers always win.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import glob, os, torch; d = os.path.dirname(os.path.dirname(torch.__file__)); print(';'.join(sorted(glob.glob(os.path.join(d, 'nvidia', 'cu[0-9]*', 'include')))))"
    OUTPUT_VARIABLE LIFTPLACE_NVIDIA_WHEEL_INCLUDES OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    set(LIFTPLACE_NVIDIA_WHEEL_INCLUDES "")
  endif()
endmacro()
