import os
import sys

import torch

# testing.py sits beside the tests; the package itself must come from site-packages
# (the installed build with its extension), never from the source tree.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
