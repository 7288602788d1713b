package loaders

import (
	"context"
	"crypto/tls"
	"fmt"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/transport"
)

// TLS on the destination's channels (docs/protocol.md, "Migration
// channels"). "TLS must match" is decided from each connection's first
// bytes, never by comparing object ids: with the parameter tls-creds set,
// a connection must open with a TLS ClientHello, which runs the server
// handshake with the tls-creds-x509 object it names (endpoint server),
// checking the source's certificate (verify-peer) and its distinguished
// name against tls-authz; then the stream's magic (QEVM, or a multifd
// channel's) is read inside the TLS connection. Without tls-creds a
// ClientHello is refused. Either refusal is a *creds.MismatchError whose
// message names TLS and says which side to change. The return path and
// the commit protocol's frames run inside the same TLS connection.

// Parameters the destination's TLS reads.
const (
	paramTLSCreds = "tls-creds"
	paramTLSAuthz = "tls-authz"
)

// acceptTLS is one incoming migration's TLS decision: made at its first
// connection from the live configuration (the destination listens with its
// configuration still mutable, as QEMU reads tls-creds at each handshake)
// and kept for every channel after it, so the channels of one migration
// never mix TLS and plaintext. It belongs to the loader goroutine.
type acceptTLS struct {
	decided bool
	cfg     *tls.Config // nil: plaintext
	err     error
}

// tlsConfig returns the server configuration tls-creds and tls-authz ask
// for, nil for plaintext.
func (l *loader) tlsConfig() (*tls.Config, error) {
	if !l.tls.decided {
		l.tls.decided = true
		l.tls.cfg, l.tls.err = l.serverTLS()
	}
	return l.tls.cfg, l.tls.err
}

func (l *loader) serverTLS() (*tls.Config, error) {
	cfg := l.in.c.Config()
	id := cfg.Params[paramTLSCreds]
	if id == "" {
		return nil, nil
	}
	objs := l.in.opts.Creds
	if objs == nil {
		return nil, fmt.Errorf("tls-creds '%s' is set, but this destination has no object registry (loaders.Options.Creds)", id)
	}
	x, err := objs.Creds(id, creds.Server)
	if err != nil {
		return nil, err
	}
	var az creds.Authorizer
	if a := cfg.Params[paramTLSAuthz]; a != "" {
		if az, err = objs.Authz(a); err != nil {
			return nil, err
		}
	}
	return x.ServerConfig(az)
}

// secure runs the TLS server handshake on a connection whose first bytes
// (head, already read) are a ClientHello, bounded by channelTimeout and
// the run's cancel. On error the caller still owns c.
func (l *loader) secure(c transport.Conn, head []byte, cfg *tls.Config) (transport.Conn, error) {
	ctx, cancel := context.WithTimeout(l.in.ioCtx, channelTimeout)
	defer cancel()
	return transport.ServerTLS(ctx, c, head, cfg)
}
