# The part of OpenSSL 3's EVP digest interface the native core uses. The SHA256_* functions
# are deprecated in OpenSSL 3; EVP with an explicitly fetched EVP_MD is the supported path
# and also skips the implicit per-call algorithm lookup.

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct OSSL_LIB_CTX
    ctypedef struct OSSL_PARAM
    ctypedef struct EVP_MD
    ctypedef struct EVP_MD_CTX

    enum: EVP_MAX_MD_SIZE

    EVP_MD *EVP_MD_fetch(OSSL_LIB_CTX *libctx, const char *algorithm, const char *properties)
    EVP_MD_CTX *EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx)
    int EVP_DigestInit_ex2(EVP_MD_CTX *ctx, const EVP_MD *md, const OSSL_PARAM *params)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *data, size_t count)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *size)
