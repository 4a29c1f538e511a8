# bpf_object(NAME SOURCE): compile SOURCE with the clang BPF target against a vmlinux.h generated
# from the running kernel's BTF, and generate a libbpf skeleton <NAME>.skel.h. Adds an INTERFACE
# library target bpf_<NAME> whose include path holds the skeleton.
find_program(BPFTOOL bpftool PATHS /usr/sbin /sbin REQUIRED)
find_program(BPF_CLANG clang REQUIRED)
set(WEFT_VMLINUX_BTF "/sys/kernel/btf/vmlinux" CACHE FILEPATH "Kernel BTF used to generate vmlinux.h")
set(WEFT_BPF_GEN_DIR ${CMAKE_BINARY_DIR}/bpf)
file(MAKE_DIRECTORY ${WEFT_BPF_GEN_DIR})

add_custom_command(
  OUTPUT ${WEFT_BPF_GEN_DIR}/vmlinux.h
  COMMAND ${BPFTOOL} btf dump file ${WEFT_VMLINUX_BTF} format c > ${WEFT_BPF_GEN_DIR}/vmlinux.h
  COMMENT "Generating vmlinux.h from ${WEFT_VMLINUX_BTF}"
  VERBATIM)
add_custom_target(weft_vmlinux DEPENDS ${WEFT_BPF_GEN_DIR}/vmlinux.h)

execute_process(COMMAND uname -m OUTPUT_VARIABLE WEFT_ARCH OUTPUT_STRIP_TRAILING_WHITESPACE)
if(WEFT_ARCH STREQUAL "x86_64")
  set(WEFT_BPF_ARCH x86)
elseif(WEFT_ARCH STREQUAL "aarch64")
  set(WEFT_BPF_ARCH arm64)
else()
  set(WEFT_BPF_ARCH ${WEFT_ARCH})
endif()

function(bpf_object NAME SOURCE)
  set(obj ${WEFT_BPF_GEN_DIR}/${NAME}.bpf.o)
  set(skel ${WEFT_BPF_GEN_DIR}/${NAME}.skel.h)
  file(GLOB bpf_headers ${CMAKE_SOURCE_DIR}/bpf/lib/*.h ${CMAKE_SOURCE_DIR}/bpf/abi/*.h)
  add_custom_command(
    OUTPUT ${obj}
    COMMAND ${BPF_CLANG} -g -O2 -target bpf -D__TARGET_ARCH_${WEFT_BPF_ARCH}
            -I${WEFT_BPF_GEN_DIR} -I${CMAKE_SOURCE_DIR}/bpf -I${CMAKE_SOURCE_DIR}
            -Wall -Werror -Wno-unused-function
            -c ${CMAKE_CURRENT_SOURCE_DIR}/${SOURCE} -o ${obj}
    DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${SOURCE} ${bpf_headers} weft_vmlinux
            ${WEFT_BPF_GEN_DIR}/vmlinux.h
    COMMENT "BPF ${SOURCE}"
    VERBATIM)
  add_custom_command(
    OUTPUT ${skel}
    COMMAND ${BPFTOOL} gen skeleton ${obj} name ${NAME} > ${skel}
    DEPENDS ${obj}
    COMMENT "Skeleton ${NAME}.skel.h"
    VERBATIM)
  add_custom_target(bpf_${NAME}_gen DEPENDS ${skel})
  add_library(bpf_${NAME} INTERFACE)
  add_dependencies(bpf_${NAME} bpf_${NAME}_gen)
  target_include_directories(bpf_${NAME} INTERFACE ${WEFT_BPF_GEN_DIR})
endfunction()
