/*
 * Read-only mapping of a whole model file (GGUF, safetensors), shared by
 * the file readers: the open/fstat/mmap steps and their error messages.
 */
#ifndef LLM_MAPPED_FILE_H
#define LLM_MAPPED_FILE_H

#include <stddef.h>

#include "common.h"

/* Maps path read-only; a regular file of at least min_size bytes.  On
 * error returns NULL with err naming the file and the reason. */
const void *llm_map_file(const char *path, size_t min_size, size_t *size,
                         llm_err *err);
void        llm_unmap_file(const void *map, size_t size);

/* Drops this process's pages of [p, p + n), a range of a mapping that
 * will not be read again (a backend copied it): whole pages only, the
 * file's page cache stays.  Reading it again would fault it back in. */
void        llm_map_file_drop(const void *p, size_t n);

#endif /* LLM_MAPPED_FILE_H */
