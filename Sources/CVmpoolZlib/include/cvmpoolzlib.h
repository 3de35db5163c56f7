#ifndef CVMPOOLZLIB_H
#define CVMPOOLZLIB_H

#include <stddef.h>

/// A gzip decompressor (zlib's inflate), for image layers. Opaque.
typedef struct vmpool_gunzip vmpool_gunzip;

/// A new decompressor, or NULL when out of memory.
vmpool_gunzip *vmpool_gunzip_new(void);

/// Decompresses from `in` (`in_len` bytes) into `out` (`out_len` bytes); sets how many bytes
/// were taken and made. Concatenated gzip members are one stream. Returns 0 while the stream
/// goes on, 1 when a member just ended, -1 on corrupt data (then `error` names why).
int vmpool_gunzip_step(vmpool_gunzip *z, const void *in, size_t in_len, size_t *in_used, void *out,
                       size_t out_len, size_t *out_made, const char **error);

void vmpool_gunzip_free(vmpool_gunzip *z);

#endif
