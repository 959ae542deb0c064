# A CPU-only build against a CUDA torch (GDC_CUDA=OFF, or AUTO without nvcc: the common
# `pip install torch` on Linux, which is a CUDA build, on a machine without the CUDA toolkit).
# find_package(Torch) cannot be used there: torch's Caffe2Config.cmake insists on finding the CUDA
# toolkit ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries") even
# though no CUDA code is compiled. The CPU kernels need only torch's headers and its shared
# libraries, so this sets TORCH_LIBRARIES / TORCH_LIBRARY as find_package(Torch) would, for them.
# Input: _torch_prefix (torch's share/cmake folder, from CMakeLists.txt). Output: TORCH_LIBRARIES
# (an INTERFACE target), TORCH_LIBRARY (libtorch's path).
get_filename_component(_torch_root "${_torch_prefix}/../.." ABSOLUTE)  # site-packages/torch
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_cxx11_abi OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0 OR _torch_cxx11_abi STREQUAL "")
  message(FATAL_ERROR "gdc_ext: could not read torch's C++ ABI flag with ${Python_EXECUTABLE}")
endif()

set(_gdc_torch_libs)
foreach(_lib c10 torch torch_cpu)
  find_library(_gdc_${_lib}_path ${_lib} PATHS "${_torch_root}/lib" NO_DEFAULT_PATH)
  if(NOT _gdc_${_lib}_path)
    message(FATAL_ERROR "gdc_ext: lib${_lib}.so not found in ${_torch_root}/lib")
  endif()
  list(APPEND _gdc_torch_libs "${_gdc_${_lib}_path}")
endforeach()

add_library(gdc_torch_cpu INTERFACE)
target_include_directories(gdc_torch_cpu SYSTEM INTERFACE
  "${_torch_root}/include" "${_torch_root}/include/torch/csrc/api/include")
target_link_libraries(gdc_torch_cpu INTERFACE ${_gdc_torch_libs})
target_compile_definitions(gdc_torch_cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi})
set(TORCH_LIBRARIES gdc_torch_cpu)
set(TORCH_LIBRARY "${_gdc_torch_path}")
message(STATUS "gdc_ext: CPU-only build against torch with CUDA ${_torch_cuda} (torch's CMake config skipped)")
