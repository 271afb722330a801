# Decide whether to build the CUDA kernels. Never from torch.cuda.is_available():
# build hosts usually have no GPU.
set(LIFTPLACE_WITH_CUDA OFF)
if(LIFTPLACE_CUDA STREQUAL "OFF")
  return()
endif()

include(CheckLanguage)
if(NOT TORCH_HAS_CUDA)
  if(LIFTPLACE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LIFTPLACE_CUDA=ON but the installed torch is a CPU build. "
                        "Install a CUDA build of torch or use LIFTPLACE_CUDA=OFF.")
  endif()
  message(STATUS "liftplace: torch has no CUDA; building CPU kernels only")
  return()
endif()

check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(LIFTPLACE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LIFTPLACE_CUDA=ON but no CUDA compiler (nvcc) was found. "
                        "Put nvcc on PATH or set CUDACXX / CUDA_HOME.")
  endif()
  message(STATUS "liftplace: nvcc not found; building CPU kernels only")
  return()
endif()

enable_language(CUDA)
set(LIFTPLACE_WITH_CUDA ON)
# The newest listed architecture also gets PTX so newer GPUs can JIT it.
set(LIFTPLACE_CUDA_ARCHITECTURES "")
list(LENGTH LIFTPLACE_CUDA_ARCH _n)
math(EXPR _last "${_n} - 1")
foreach(_i RANGE ${_last})
  list(GET LIFTPLACE_CUDA_ARCH ${_i} _a)
  if(_i EQUAL _last)
    list(APPEND LIFTPLACE_CUDA_ARCHITECTURES "${_a}-real" "${_a}-virtual")
  else()
    list(APPEND LIFTPLACE_CUDA_ARCHITECTURES "${_a}-real")
  endif()
endforeach()
message(STATUS "liftplace: building CUDA kernels for ${LIFTPLACE_CUDA_ARCHITECTURES}")
