package qmp

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"strings"

	"github.com/migctl/migctl/creds"
)

// DialTLS connects to a QMP server's TCP socket whose clients authenticate
// with certificates (serve --qmp-tls-creds): addr is tcp:HOST:PORT (or
// HOST:PORT), cfg carries the client certificate and the CA that signed
// the server's. It then reads the greeting and negotiates, as DialAddr.
// A refusal of the certificate by the server arrives as its TLS alert,
// classified by package creds (*creds.PeerRejectedError).
func DialTLS(ctx context.Context, addr string, cfg *tls.Config) (*Client, error) {
	address := strings.TrimPrefix(addr, "tcp:")
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("connect to the QMP socket %s: %w", address, err)
	}
	tc, err := creds.ClientHandshake(ctx, conn, cfg)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP socket %s: %w", address, err)
	}
	c, err := NewClient(ctx, tc)
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("QMP socket %s: %w", address, creds.Classify(err))
	}
	return c, nil
}
