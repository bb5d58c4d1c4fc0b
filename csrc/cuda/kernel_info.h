// The static launch facts of the CUDA kernels (see kernel_info.cu), for the pybind11 module.
#pragma once

#include <pybind11/pybind11.h>

namespace helix {

pybind11::dict kernel_launch_info();

}  // namespace helix
