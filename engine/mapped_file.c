/*
 * Read-only whole-file mappings (see mapped_file.h).
 */
#include "mapped_file.h"

#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>


const void *
llm_map_file(const char *path, size_t min_size, size_t *size, llm_err *err)
{
    struct stat  st;
    int          fd;
    void        *map;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        llm_err_set(err, LLM_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        llm_err_set(err, LLM_EIO, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if ((size_t) st.st_size < min_size) {
        llm_err_set(err, LLM_EFORMAT, "%s: truncated file (%lld bytes)",
                    path, (long long) st.st_size);
        close(fd);
        return NULL;
    }
    map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        llm_err_set(err, LLM_EIO, "%s: mmap: %s", path, strerror(errno));
        return NULL;
    }
    *size = (size_t) st.st_size;
    return map;
}


void
llm_unmap_file(const void *map, size_t size)
{
    if (map != NULL) {
        munmap((void *) map, size);
    }
}


void
llm_map_file_drop(const void *p, size_t n)
{
    long       page = sysconf(_SC_PAGESIZE);
    uintptr_t  a, e;

    if (p == NULL || page <= 0) {
        return;
    }
    a = ((uintptr_t) p + (uintptr_t) page - 1) & ~((uintptr_t) page - 1);
    e = ((uintptr_t) p + n) & ~((uintptr_t) page - 1);
    if (e > a) {
        madvise((void *) a, e - a, MADV_DONTNEED);
    }
}
