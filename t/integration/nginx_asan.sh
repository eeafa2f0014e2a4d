#!/bin/sh
# The distro's nginx with the ASan and UBSan runtimes preloaded, so that a
# module built with -fsanitize=address,undefined loads (the runtime must
# come first in the library list).  `make asan-integration` points the
# tests at it (NGINX_BIN).  Reports go to files under $LLM_ASAN_LOGS; leak
# checking is off, as nginx frees its pools only by exiting.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
ASAN_OPTIONS=detect_leaks=0:log_path=${LLM_ASAN_LOGS:-/tmp}/nginx
UBSAN_OPTIONS=print_stacktrace=1:log_path=${LLM_ASAN_LOGS:-/tmp}/ubsan-nginx
export LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS
exec /usr/sbin/nginx "$@"
