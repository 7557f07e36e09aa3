# edge-zo's CUDA kernels (native/edge_zo_cuda.cu) in the CMake build. CMakeLists.txt
# includes this file once edge_zo_core exists:
#
#   include(native/cuda.cmake)
#
# -DEDGE_ZO_CUDA=AUTO|ON|OFF (default AUTO: on when the llama.cpp found was built with
# GGML_CUDA and CMake finds a CUDA compiler). CMAKE_CUDA_ARCHITECTURES picks the GPU
# targets (default all-major; 90 for H100/H200). With it on, edge_zo_core applies the
# sparse deltas of nodes in CUDA buffers with these kernels, and two more targets exist:
# edge_zo_cuda (static library) and edge_zo_cuda_check (bench/gpu/kernel_check.cu: the
# kernels against a host reference, bit for bit; CTest entry edge_zo_cuda_kernels, which
# needs a GPU at test time).
set(EDGE_ZO_CUDA AUTO CACHE STRING "Build the CUDA kernels of the sparse path: AUTO, ON or OFF")
set_property(CACHE EDGE_ZO_CUDA PROPERTY STRINGS AUTO ON OFF)

set(_ez_cuda OFF)
if(EDGE_ZO_CUDA STREQUAL "AUTO")
    if(GGML_CUDA) # set by llama.cpp's ggml-config.cmake
        include(CheckLanguage)
        check_language(CUDA)
        if(CMAKE_CUDA_COMPILER)
            set(_ez_cuda ON)
        else()
            message(WARNING "edge-zo: llama.cpp has a CUDA backend but no CUDA compiler was found: the sparse "
                "path will copy GPU tensors through the host (slow). Set CMAKE_CUDA_COMPILER or CUDACXX.")
        endif()
    endif()
elseif(EDGE_ZO_CUDA)
    set(_ez_cuda ON)
endif()

if(_ez_cuda)
    if(NOT CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_VERSION VERSION_LESS 3.23)
        set(CMAKE_CUDA_ARCHITECTURES all-major)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)

    add_library(edge_zo_cuda STATIC native/edge_zo_cuda.cu)
    target_include_directories(edge_zo_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/native)
    target_link_libraries(edge_zo_cuda PUBLIC CUDA::cudart)
    set_target_properties(edge_zo_cuda PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
        POSITION_INDEPENDENT_CODE ON)

    target_compile_definitions(edge_zo_core PRIVATE EDGE_ZO_CUDA=1)
    target_link_libraries(edge_zo_core PUBLIC edge_zo_cuda)

    add_executable(edge_zo_cuda_check bench/gpu/kernel_check.cu)
    target_link_libraries(edge_zo_cuda_check PRIVATE edge_zo_cuda)
    set_target_properties(edge_zo_cuda_check PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
    # The host reference must not fuse a*b+c either: the check is bit for bit.
    target_compile_options(edge_zo_cuda_check PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-ffp-contract=off>)
    if(COMMAND add_test)
        add_test(NAME edge_zo_cuda_kernels COMMAND edge_zo_cuda_check)
        set_tests_properties(edge_zo_cuda_kernels PROPERTIES LABELS gpu)
    endif()
    message(STATUS "edge-zo: CUDA kernels on (architectures: ${CMAKE_CUDA_ARCHITECTURES})")
else()
    message(STATUS "edge-zo: CUDA kernels off (EDGE_ZO_CUDA=${EDGE_ZO_CUDA}, llama.cpp GGML_CUDA=${GGML_CUDA})")
endif()
