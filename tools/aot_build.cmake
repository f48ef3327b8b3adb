# The build step that compiles the shipped Triton cubins (tools/aot.py --shipped), with FASTTRAIN_AOT_ARCHS read at
# every build, not only at configure: a changed value recompiles the set in a reused build folder, with or without a
# reconfigure, and an unchanged one leaves the step up to date.
#
# include()d by CMakeLists.txt: fasttrain_aot_archs(<var>) parses the value, fasttrain_add_aot(<source dir> <python>
# <jobs>) adds the step. The step runs this file as a script (cmake -DFASTTRAIN_AOT_STEP=... -P) at build time:
#   record, -DSTAMP=<file>: write the parsed archs ("none" for none) to STAMP only when they differ from what it holds
#     (an always-run target; the compile step depends on STAMP).
#   compile, -DSTAMP= -DOUT=<dir> -DDONE=<file> -DSOURCE=<dir> -DPYTHON=<exe> -DJOBS=<n>: compile the archs in STAMP
#     into OUT (emptied first; left empty for none), then touch DONE.

# Some of 80 and 90 (comma-, space- or semicolon-separated; default both), or "none" for an empty list; anything else
# stops with an error that names the variable.
function(fasttrain_aot_archs out)
  set(_value "$ENV{FASTTRAIN_AOT_ARCHS}")
  set(_archs "80;90")
  if(_value STREQUAL "none")
    set(_archs "")
  elseif(NOT _value STREQUAL "")
    string(REGEX REPLACE "[ ,;]+" ";" _archs "${_value}")
    list(REMOVE_ITEM _archs "")
    list(REMOVE_DUPLICATES _archs)
    foreach(_arch IN LISTS _archs)
      if(NOT _arch MATCHES "^(80|90)$")
        message(FATAL_ERROR "FASTTRAIN_AOT_ARCHS: expected some of 80 and 90 (e.g. \"90\" or \"80,90\") or none, "
                            "got '${_value}'")
      endif()
    endforeach()
    if(NOT _archs)
      message(FATAL_ERROR "FASTTRAIN_AOT_ARCHS: expected some of 80 and 90 or none, got '${_value}'")
    endif()
  endif()
  set(${out} "${_archs}" PARENT_SCOPE)
endfunction()

# The step as the targets fasttrain_aot_archs (always run, cheap) and fasttrain_aot (all), installing
# <build>/aot/ as fasttrain/kernels/aot/. tools/aot.py and kernels/ are read from source_dir.
function(fasttrain_add_aot source_dir python jobs)
  set(_script "${CMAKE_CURRENT_FUNCTION_LIST_FILE}")
  set(_stamp "${CMAKE_CURRENT_BINARY_DIR}/aot_archs.txt")
  set(_out "${CMAKE_CURRENT_BINARY_DIR}/aot")
  set(_done "${CMAKE_CURRENT_BINARY_DIR}/aot.done")
  # BYPRODUCTS: Ninja rereads the stamp's time after the run, so an unchanged value triggers nothing downstream.
  add_custom_target(fasttrain_aot_archs
    COMMAND "${CMAKE_COMMAND}" -DFASTTRAIN_AOT_STEP=record "-DSTAMP=${_stamp}" -P "${_script}"
    BYPRODUCTS "${_stamp}"
    VERBATIM)
  file(GLOB _kernels CONFIGURE_DEPENDS "${source_dir}/kernels/*.py")
  add_custom_command(
    OUTPUT "${_done}"
    COMMAND "${CMAKE_COMMAND}" -DFASTTRAIN_AOT_STEP=compile "-DSTAMP=${_stamp}" "-DOUT=${_out}" "-DDONE=${_done}"
            "-DSOURCE=${source_dir}" "-DPYTHON=${python}" "-DJOBS=${jobs}" -P "${_script}"
    DEPENDS "${_stamp}" "${_script}" "${source_dir}/tools/aot.py" ${_kernels}
    COMMENT "fasttrain: compiling the shipped Triton kernels for FASTTRAIN_AOT_ARCHS (tools/aot.py --shipped)"
    VERBATIM)
  add_custom_target(fasttrain_aot ALL DEPENDS "${_done}")
  add_dependencies(fasttrain_aot fasttrain_aot_archs)
  install(DIRECTORY "${_out}/" DESTINATION fasttrain/kernels/aot)
endfunction()

if(FASTTRAIN_AOT_STEP STREQUAL "record")
  fasttrain_aot_archs(_archs)
  if(NOT _archs)
    set(_archs "none")
  endif()
  set(_old "")
  if(EXISTS "${STAMP}")
    file(READ "${STAMP}" _old)
  endif()
  if(NOT _old STREQUAL _archs)
    file(WRITE "${STAMP}" "${_archs}")
  endif()
elseif(FASTTRAIN_AOT_STEP STREQUAL "compile")
  file(READ "${STAMP}" _archs)
  file(REMOVE_RECURSE "${OUT}")
  file(MAKE_DIRECTORY "${OUT}")
  if(NOT _archs STREQUAL "none")
    message(STATUS "fasttrain: shipped Triton kernels for sm ${_archs}")
    execute_process(
      COMMAND "${CMAKE_COMMAND}" -E env TRITON_INTERPRET=0 "${PYTHON}" "${SOURCE}/tools/aot.py" --arch ${_archs}
              --dtype bf16 fp16 fp32 --shipped --out "${OUT}" --kernels-dir "${SOURCE}/kernels" --jobs ${JOBS}
      COMMAND_ERROR_IS_FATAL ANY)
  endif()
  file(TOUCH "${DONE}")
endif()
