# Turns a binary file into a C source holding it as a byte array (used for the descriptor set
# that gRPC server reflection serves). Run as a script:
#   cmake -DIN=<file> -DOUT=<file.c> -DNAME=<symbol> -P embed_file.cmake
# Writes `const unsigned char NAME[]` and `const size_t NAME_len`.
if(NOT DEFINED IN OR NOT DEFINED OUT OR NOT DEFINED NAME)
  message(FATAL_ERROR "usage: cmake -DIN=file -DOUT=file.c -DNAME=symbol -P embed_file.cmake")
endif()
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR n "${hex_len} / 2")
if(n EQUAL 0)
  set(body "    0x00")
else()
  # 16 bytes per line, each as 0xNN.
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1, " body "${hex}")
  # (CMake regular expressions have no {n}: the 16 is spelled out.)
  set(b "0x[0-9a-f][0-9a-f], ")
  string(REGEX REPLACE "(${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b}${b})" "\\1\n    "
    body "${body}")
  string(REGEX REPLACE "\n    $" "" body "${body}")
  string(REGEX REPLACE ", $" "" body "${body}")
  string(REPLACE ", \n" ",\n" body "${body}")
  set(body "    ${body}")
endif()
get_filename_component(in_name "${IN}" NAME)
file(WRITE "${OUT}.tmp"
  "/* Generated at build time from ${in_name} by cmake/embed_file.cmake: do not edit. */\n"
  "#include <stddef.h>\n\n"
  "extern const unsigned char ${NAME}[];\n"
  "extern const size_t ${NAME}_len;\n\n"
  "const unsigned char ${NAME}[] = {\n${body}\n};\n"
  "const size_t ${NAME}_len = ${n};\n")
file(RENAME "${OUT}.tmp" "${OUT}")
