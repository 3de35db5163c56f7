#include "cvmpoolzlib.h"

#include <stdlib.h>
#include <zlib.h>

struct vmpool_gunzip {
    z_stream stream;
    int started;
};

vmpool_gunzip *vmpool_gunzip_new(void) {
    vmpool_gunzip *z = calloc(1, sizeof *z);
    if (!z) return NULL;
    // 16 + 15: gzip framing only, the largest window.
    if (inflateInit2(&z->stream, 16 + 15) != Z_OK) {
        free(z);
        return NULL;
    }
    return z;
}

int vmpool_gunzip_step(vmpool_gunzip *z, const void *in, size_t in_len, size_t *in_used, void *out,
                       size_t out_len, size_t *out_made, const char **error) {
    if (in_len > 0x7fffffff) in_len = 0x7fffffff;
    if (out_len > 0x7fffffff) out_len = 0x7fffffff;
    z->stream.next_in = (Bytef *)in;
    z->stream.avail_in = (uInt)in_len;
    z->stream.next_out = (Bytef *)out;
    z->stream.avail_out = (uInt)out_len;
    int rc = inflate(&z->stream, Z_NO_FLUSH);
    *in_used = in_len - z->stream.avail_in;
    *out_made = out_len - z->stream.avail_out;
    *error = NULL;
    if (rc == Z_STREAM_END) {
        inflateReset(&z->stream);
        return 1;
    }
    if (rc == Z_OK || rc == Z_BUF_ERROR) return 0;
    *error = z->stream.msg ? z->stream.msg : "corrupt gzip data";
    return -1;
}

void vmpool_gunzip_free(vmpool_gunzip *z) {
    if (!z) return;
    inflateEnd(&z->stream);
    free(z);
}
