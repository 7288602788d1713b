package engine

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// TLS on the source's channels (docs/protocol.md, "Migration channels"):
// with the parameter tls-creds set, every channel the migration dials —
// the main one (its return path is the same connection) and each multifd
// channel — runs a TLS 1.3 client handshake before its first byte, with
// the tls-creds-x509 object it names (endpoint client), checking the
// destination's certificate against tls-hostname or the host of a tcp:
// address, as QEMU does (migration/tls.c). The sinks that look for
// interfaces on the dialled channel (the one-way Committer, the mapped-ram
// file, the RDMA writer) never see a TLS channel: rules refuse TLS on
// every transport but a two-way socket (migctl/tls-needs-two-way,
// migctl/rdma-no-tls, mapped-ram/no-tls).

// tlsHandshakeTimeout bounds each channel's TLS handshake.
const tlsHandshakeTimeout = 10 * time.Second

// Parameters the TLS dialer reads.
const (
	paramTLSCreds    = "tls-creds"
	paramTLSHostname = "tls-hostname"
)

// tlsDialer wraps a migration's Dial. The TLS settings are read once, at
// the first dial, from the configuration frozen when the side entered
// setup: every channel of a migration uses the same.
type tlsDialer struct {
	c    *machine.Controller
	objs *creds.Objects
	dial func(ctx context.Context, a transport.Addr) (transport.Conn, error)

	once sync.Once
	cfg  *tls.Config // nil: plaintext
	err  error
}

// Dial opens a channel with the wrapped dial and, when tls-creds is set,
// runs the TLS handshake on it (bounded by tlsHandshakeTimeout and ctx).
func (d *tlsDialer) Dial(ctx context.Context, a transport.Addr) (transport.Conn, error) {
	d.once.Do(func() { d.cfg, d.err = d.setup(a) })
	if d.err != nil {
		return nil, d.err
	}
	conn, err := d.dial(ctx, a)
	if err != nil || d.cfg == nil {
		return conn, err
	}
	hctx, cancel := context.WithTimeout(ctx, tlsHandshakeTimeout)
	defer cancel()
	tc, err := transport.ClientTLS(hctx, conn, d.cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return tc, nil
}

// setup builds the client configuration tls-creds asks for, or nil.
func (d *tlsDialer) setup(a transport.Addr) (*tls.Config, error) {
	cfg, ok := d.c.Frozen(spec.Outgoing)
	if !ok {
		cfg = d.c.Config()
	}
	id := cfg.Params[paramTLSCreds]
	if id == "" {
		return nil, nil
	}
	if a.Scheme == transport.SchemeRDMA {
		return nil, fmt.Errorf("tls-creds is set, and an rdma: migration cannot be carried in TLS: clear tls-creds or use tcp:")
	}
	if d.objs == nil {
		return nil, fmt.Errorf("tls-creds '%s' is set, but this engine has no object registry (engine.Options.Creds)", id)
	}
	x, err := d.objs.Creds(id, creds.Client)
	if err != nil {
		return nil, err
	}
	host := ""
	if a.Scheme == transport.SchemeTCP {
		host = a.Host
	}
	return x.ClientConfig(creds.Hostname(cfg.Params[paramTLSHostname], host))
}

// tlsRefusal reports whether err is the destination refusing this side's
// TLS credentials (its alert, read on the return path): a better reason
// than the write error the closed connection caused.
func tlsRefusal(err error) bool {
	var pe *creds.PeerRejectedError
	return errors.As(err, &pe)
}
