// Debian 12's civetweb (under prometheus-cpp's Exposer) loads OpenSSL at run time with
// dlopen("libssl.so") and looks up SSL_get_peer_certificate, which OpenSSL 3 renamed
// (SSL_get1_peer_certificate): the lookup yields NULL and the first HTTPS request crashes
// the server. This library carries the soname "libssl.so"; loaded before the metrics port
// starts (metrics_exposer.cc), civetweb's dlopen finds it, and every other symbol resolves
// through its dependency on the real libssl.so.3.
#include <openssl/ssl.h>

#undef SSL_get_peer_certificate
extern "C" X509* SSL_get_peer_certificate(const SSL* ssl) { return SSL_get1_peer_certificate(ssl); }
