// Package creds is migctl's TLS: QEMU's tls-creds-x509 objects turned into
// crypto/tls configurations, QEMU's authz-list and authz-simple objects
// checked against a peer certificate's distinguished name, and Sniff,
// which tells from a connection's first bytes whether the peer speaks TLS.
//
// The name is QEMU's: tls-creds is the migration parameter naming the
// credentials object, and everything here exists to make those
// credentials work (authorization is part of using them: tls-authz only
// means something with verified credentials).
//
// # Shape, as in QEMU
//
// A client adds objects with object-add ([Objects.Add]), then sets the
// migration parameters tls-creds (a tls-creds-x509 id), tls-hostname and
// tls-authz (an authz id). The destination (endpoint=server) loads
// ca-cert.pem, server-cert.pem and server-key.pem (and ca-crl.pem if
// present) from the object's dir; the source (endpoint=client) loads
// ca-cert.pem and, for mutual TLS, client-cert.pem and client-key.pem.
// verify-peer (default on) makes the server require a client certificate
// signed by its CA and makes the client check the server's certificate
// and host name. [X509.ClientConfig] and [X509.ServerConfig] build the
// tls.Config for each end; [ClientHandshake] and [ServerHandshake] run the
// handshake bounded by a context and return typed errors.
//
// What migctl does not do, and says so when asked: tls-creds-psk (Go's
// crypto/tls has no external pre-shared keys, and migctl writes no TLS
// cryptography: [ErrPSK]), tls-creds-anon, GnuTLS priority strings,
// encrypted keys (passwordid), authz-listfile and authz-pam. TLS is 1.3
// only. Unlike GnuTLS, crypto/tls matches a host name only against the
// certificate's subject alternative names (DNS or IP), never its CN.
//
// # Errors
//
// Every failure has a type whose message names the cause and what to
// change: [CertificateError] (this side refused the peer's certificate:
// unknown CA, expired, wrong host name, none sent, revoked),
// [AuthzError] (the certificate is valid but tls-authz denies its DN),
// [PeerRejectedError] (the peer refused this side: its TLS alert),
// [MismatchError] (TLS on one side only), [LoadError] (a credentials file)
// and [UnsupportedError]. [Classify] maps crypto/tls's errors to them.
//
// # Telling TLS from plaintext
//
// "TLS must match" is decided from the bytes, never by comparing object
// ids: the destination calls [Sniff] on each accepted connection, which
// reads 4 bytes and returns a connection that replays them, and [Expect]
// refuses a ClientHello when it has no tls-creds and the stream's magic
// (QEVM) or a multifd channel's (0x11223344) when it has.
package creds
