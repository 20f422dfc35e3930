#!/usr/bin/env bash
# Test certificates for the TLS suites, made fresh by openssl in the directory given (default:
# the current one): two CAs (ca1, ca2), a server certificate from each (server1, server2:
# SAN 127.0.0.1 and localhost) and a client certificate from each (client1, client2).
# Files: NAME.key and NAME.crt (PEM). Valid for 2 days; quiet unless openssl fails.
set -euo pipefail
cd "${1:-.}"
ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.crt" -days 2 -subj "/CN=$1"; }
leaf() {  # name ca subjectAltName
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
  printf "subjectAltName=%s\n" "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -out "$1.crt" \
    -days 2 -extfile "$1.ext"
}
{
  ca ca1
  ca ca2
  leaf server1 ca1 "IP:127.0.0.1,DNS:localhost"
  leaf server2 ca2 "IP:127.0.0.1,DNS:localhost"
  leaf client1 ca1 "DNS:client1"
  leaf client2 ca2 "DNS:client2"
} >make_certs.log 2>&1 || { cat make_certs.log >&2; exit 1; }
