# Decides GDC_WITH_CUDA and prepares the CUDA toolchain before find_package(Torch).
# The fixes below are build-notes pitfalls 5-10, each measured on the CI machine kind.
set(GDC_WITH_CUDA OFF)
if(GDC_CUDA STREQUAL "OFF")
  return()
endif()

if(NOT DEFINED ENV{CUDA_HOME} AND EXISTS "/usr/local/cuda/bin/nvcc")
  set(ENV{CUDA_HOME} "/usr/local/cuda")
endif()
if(DEFINED ENV{CUDA_HOME})
  set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}")
  set(ENV{CUDA_PATH} "$ENV{CUDA_HOME}")
  set(CMAKE_CUDA_COMPILER "$ENV{CUDA_HOME}/bin/nvcc" CACHE FILEPATH "")
endif()
find_program(_gdc_nvcc nvcc HINTS "$ENV{CUDA_HOME}/bin" /usr/local/cuda/bin)

if(_torch_cuda STREQUAL "" OR NOT _gdc_nvcc)
  if(GDC_CUDA STREQUAL "ON")
    message(FATAL_ERROR "gdc_ext: GDC_CUDA=ON but torch has CUDA '${_torch_cuda}' and nvcc '${_gdc_nvcc}'")
  endif()
  message(STATUS "gdc_ext: building CPU kernels only (torch CUDA: '${_torch_cuda}', nvcc: '${_gdc_nvcc}')")
  return()
endif()

execute_process(COMMAND "${_gdc_nvcc}" --version OUTPUT_VARIABLE _nvcc_out)
string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_nvcc_out}")
set(_nvcc_major "${CMAKE_MATCH_1}")
string(REGEX MATCH "^([0-9]+)" _m "${_torch_cuda}")
set(_torch_cuda_major "${CMAKE_MATCH_1}")
if(NOT _nvcc_major STREQUAL _torch_cuda_major)
  message(FATAL_ERROR "gdc_ext: nvcc is CUDA ${_nvcc_major}.x but torch was built with CUDA ${_torch_cuda}; "
                      "install a torch built for CUDA ${_nvcc_major} or set GDC_CUDA=OFF")
endif()

# The minimal toolkit lacks cuBLAS/cuSPARSE/nvrtc headers and libraries; the CUDA torch wheel
# ships them under site-packages/nvidia/cu<major>.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu${_torch_cuda_major}'))"
  OUTPUT_VARIABLE _nv_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_nv_root AND EXISTS "${_nv_root}/include")
  include_directories(SYSTEM "${_nv_root}/include")
  list(APPEND CMAKE_LIBRARY_PATH "${_nv_root}/lib")
  list(APPEND CMAKE_PREFIX_PATH "${_nv_root}")
  # The wheel ships only versioned sonames (libnvrtc.so.13), which find_library does not match;
  # torch's CMake then fails with "CUDA_nvrtc_LIBRARY ... NOTFOUND" at generate time.
  file(GLOB _nvrtc "${_nv_root}/lib/libnvrtc.so.${_torch_cuda_major}")
  if(_nvrtc AND NOT CUDA_nvrtc_LIBRARY)
    set(CUDA_nvrtc_LIBRARY "${_nvrtc}" CACHE FILEPATH "nvrtc from the CUDA torch wheel")
  endif()
endif()

if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
set(CMAKE_CUDA_ARCHITECTURES OFF)
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
set(CMAKE_CUDA_STANDARD ${GDC_CXX_STANDARD})
enable_language(CUDA)
if(_nv_root AND EXISTS "${_nv_root}/include")
  # Not before enable_language: nvcc would then report the folder as an implicit include
  # directory, CMake would drop its -isystem, and the build (without CPATH) would miss cusparse.h.
  list(REMOVE_ITEM CMAKE_CUDA_IMPLICIT_INCLUDE_DIRECTORIES "${_nv_root}/include")
  set(ENV{CPATH} "${_nv_root}/include:$ENV{CPATH}")  # for torch's configure-time checks only
endif()
set(GDC_WITH_CUDA ON)
message(STATUS "gdc_ext: building CUDA kernels (nvcc ${_nvcc_major}, torch CUDA ${_torch_cuda}, arch $ENV{TORCH_CUDA_ARCH_LIST})")
