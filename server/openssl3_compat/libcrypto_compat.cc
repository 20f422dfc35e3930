// Carries the soname "libcrypto.so" for civetweb's dlopen("libcrypto.so") (see
// libssl_compat.cc); its symbols come from its dependency on the real libcrypto.so.3.
extern "C" {
int simserve_libcrypto_compat = 0;
}
