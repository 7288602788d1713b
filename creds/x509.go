package creds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"
)

// Endpoint is the side of TLS connections credentials are for
// (QCryptoTLSCredsEndpoint). A migration source is a client, a destination
// a server.
type Endpoint string

// Endpoints.
const (
	Client Endpoint = "client"
	Server Endpoint = "server"
)

// The files of a tls-creds-x509 directory, as QEMU names them
// (crypto/tlscredsx509.h).
const (
	FileCACert     = "ca-cert.pem"     // required on both endpoints
	FileCACRL      = "ca-crl.pem"      // optional, server
	FileServerCert = "server-cert.pem" // required, server
	FileServerKey  = "server-key.pem"  // required, server
	FileClientCert = "client-cert.pem" // optional, client (with its key)
	FileClientKey  = "client-key.pem"  // optional, client (with its cert)
	FileDHParams   = "dh-params.pem"   // ignored: TLS 1.3 uses ECDHE only
)

// maxFile bounds a credentials file read from disk.
const maxFile = 1 << 20

// X509Options are tls-creds-x509's properties, with QEMU's names in the
// comments.
type X509Options struct {
	ID       string   // id
	Dir      string   // dir: the directory holding the files above
	Endpoint Endpoint // endpoint: Client (the default) or Server
	// VerifyPeer (verify-peer, default true): a server requires a client
	// certificate signed by ca-cert.pem; a client checks the server's
	// certificate and host name. Off, nothing about the peer is checked.
	VerifyPeer *bool
	// SanityCheck (sanity-check, default true) checks this side's own
	// certificates when loading, as QEMU does: validity period, CA basic
	// constraints, purpose, and that the certificate verifies against
	// ca-cert.pem.
	SanityCheck *bool
	// Priority (priority) is a GnuTLS priority string: refused, since
	// crypto/tls has none; migctl uses TLS 1.3 with Go's defaults.
	Priority string
	// PasswordID (passwordid) names a secret decrypting the key: refused,
	// since crypto/tls reads only unencrypted keys.
	PasswordID string
}

// X509 is a loaded tls-creds-x509 object. It is not modified after
// LoadX509, so it is safe for concurrent use.
type X509 struct {
	id, dir    string
	endpoint   Endpoint
	verifyPeer bool
	roots      *x509.CertPool
	cas        []*x509.Certificate
	cert       *tls.Certificate // nil for a client without a certificate
	crls       []*x509.RevocationList
}

// ID returns the object's id.
func (c *X509) ID() string { return c.id }

// Endpoint returns the side the credentials are for.
func (c *X509) Endpoint() Endpoint { return c.endpoint }

// VerifyPeer reports whether the peer is verified.
func (c *X509) VerifyPeer() bool { return c.verifyPeer }

// LoadX509 reads the credentials in o.Dir as QEMU's tls-creds-x509 does
// when the object is created, and checks them when SanityCheck is on.
// Errors name the file and say what to change; refusals of what migctl
// does not implement wrap ErrUnsupported.
func LoadX509(o X509Options) (*X509, error) {
	if o.Priority != "" {
		return nil, &UnsupportedError{What: "tls-creds-x509 property 'priority'", Reason: "it is a GnuTLS priority string and Go's crypto/tls has none; migctl always uses TLS 1.3 with Go's cipher suites: remove the property"}
	}
	if o.PasswordID != "" {
		return nil, &UnsupportedError{What: "tls-creds-x509 property 'passwordid'", Reason: "Go's crypto/tls reads only unencrypted private keys: decrypt the key (openssl pkey -in key.pem -out key.pem) and protect it with file permissions"}
	}
	if o.Endpoint == "" {
		o.Endpoint = Client
	}
	if o.Endpoint != Client && o.Endpoint != Server {
		return nil, fmt.Errorf("Parameter 'endpoint' does not accept value '%s': use client or server", o.Endpoint)
	}
	if o.Dir == "" {
		return nil, errors.New("Missing 'dir' property value: tls-creds-x509 needs the directory holding ca-cert.pem and the certificates")
	}
	c := &X509{id: o.ID, dir: o.Dir, endpoint: o.Endpoint, verifyPeer: o.VerifyPeer == nil || *o.VerifyPeer}
	sanity := o.SanityCheck == nil || *o.SanityCheck
	path := func(name string) string { return filepath.Join(o.Dir, name) }

	caPEM, err := c.read(FileCACert, true)
	if err != nil {
		return nil, err
	}
	c.cas, err = parseCerts(caPEM)
	if err != nil || len(c.cas) == 0 {
		if err == nil {
			err = errors.New("no CERTIFICATE block")
		}
		return nil, &LoadError{ID: c.id, File: path(FileCACert), Err: fmt.Errorf("Unable to import CA certificate list: %w", err)}
	}
	c.roots = x509.NewCertPool()
	for _, ca := range c.cas {
		c.roots.AddCert(ca)
	}

	certName, keyName, required := FileClientCert, FileClientKey, false
	if c.endpoint == Server {
		certName, keyName, required = FileServerCert, FileServerKey, true
	}
	certPEM, err := c.read(certName, required)
	if err != nil {
		return nil, err
	}
	keyPEM, err := c.read(keyName, required)
	if err != nil {
		return nil, err
	}
	switch {
	case certPEM != nil && keyPEM != nil:
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, &LoadError{ID: c.id, File: path(certName), Err: fmt.Errorf("Cannot load certificate '%s' & key '%s': %w", path(certName), path(keyName), err)}
		}
		c.cert = &pair
	case certPEM != nil || keyPEM != nil:
		missing := keyName
		if certPEM == nil {
			missing = certName
		}
		return nil, &LoadError{ID: c.id, File: path(missing), Err: errors.New("the certificate and its key go together: add the missing file or remove the other")}
	}

	if c.endpoint == Server {
		crlPEM, err := c.read(FileCACRL, false)
		if err != nil {
			return nil, err
		}
		if crlPEM != nil {
			if c.crls, err = c.parseCRLs(crlPEM); err != nil {
				return nil, &LoadError{ID: c.id, File: path(FileCACRL), Err: fmt.Errorf("Cannot load CRL: %w", err)}
			}
		}
	}
	if sanity {
		if err := c.sanityCheck(certName); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// read returns a file of the directory, nil when an optional one is
// absent.
func (c *X509) read(name string, required bool) ([]byte, error) {
	p := filepath.Join(c.dir, name)
	// O_NONBLOCK: opening a FIFO planted in the directory must not block
	// object-add; only a regular file is read.
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if !required && errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, &LoadError{ID: c.id, File: p, Err: fmt.Errorf("Unable to access credentials: %w", err)}
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, &LoadError{ID: c.id, File: p, Err: errors.New("Unable to access credentials: not a regular file")}
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return nil, &LoadError{ID: c.id, File: p, Err: err}
	}
	if len(b) > maxFile {
		return nil, &LoadError{ID: c.id, File: p, Err: fmt.Errorf("larger than %d bytes: not a credentials file", maxFile)}
	}
	return b, nil
}

func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, cert)
	}
}

func (c *X509) parseCRLs(b []byte) ([]*x509.RevocationList, error) {
	var out []*x509.RevocationList
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "X509 CRL" {
			continue
		}
		crl, err := x509.ParseRevocationList(blk.Bytes)
		if err != nil {
			return nil, err
		}
		if !slices.ContainsFunc(c.cas, func(ca *x509.Certificate) bool { return crl.CheckSignatureFrom(ca) == nil }) {
			return nil, errors.New("a CRL is not signed by any CA in ca-cert.pem")
		}
		out = append(out, crl)
	}
	if len(out) == 0 {
		return nil, errors.New("no X509 CRL block")
	}
	return out, nil
}

// sanityCheck is QEMU's qcrypto_tls_creds_x509_sanity_check: this side's
// own certificates must be usable before any peer connects.
func (c *X509) sanityCheck(certName string) error {
	now := time.Now()
	caFile := filepath.Join(c.dir, FileCACert)
	for _, ca := range c.cas {
		switch {
		case now.After(ca.NotAfter):
			return &LoadError{ID: c.id, File: caFile, Err: errors.New("The CA certificate has expired")}
		case now.Before(ca.NotBefore):
			return &LoadError{ID: c.id, File: caFile, Err: errors.New("The CA certificate is not yet active")}
		case !ca.BasicConstraintsValid:
			return &LoadError{ID: c.id, File: caFile, Err: errors.New("The certificate is missing basic constraints for a CA")}
		case !ca.IsCA:
			return &LoadError{ID: c.id, File: caFile, Err: errors.New("The certificate basic constraints do not show a CA")}
		}
	}
	if c.cert == nil {
		return nil
	}
	leaf, err := x509.ParseCertificate(c.cert.Certificate[0])
	if err != nil {
		return &LoadError{ID: c.id, File: filepath.Join(c.dir, certName), Err: err}
	}
	c.cert.Leaf = leaf
	certFile := filepath.Join(c.dir, certName)
	role, usage := "client", x509.ExtKeyUsageClientAuth
	if c.endpoint == Server {
		role, usage = "server", x509.ExtKeyUsageServerAuth
	}
	switch {
	case now.After(leaf.NotAfter):
		return &LoadError{ID: c.id, File: certFile, Err: fmt.Errorf("The %s certificate has expired (at %s): issue a new one", role, leaf.NotAfter.UTC().Format(time.RFC3339))}
	case now.Before(leaf.NotBefore):
		return &LoadError{ID: c.id, File: certFile, Err: fmt.Errorf("The %s certificate is not yet active (from %s)", role, leaf.NotBefore.UTC().Format(time.RFC3339))}
	case leaf.BasicConstraintsValid && leaf.IsCA:
		return &LoadError{ID: c.id, File: certFile, Err: fmt.Errorf("The certificate basic constraints show a CA, but we need one for a %s", role)}
	case len(leaf.ExtKeyUsage) > 0 && !slices.Contains(leaf.ExtKeyUsage, usage) && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny):
		return &LoadError{ID: c.id, File: certFile, Err: fmt.Errorf("Certificate purpose does not allow use with a TLS %s", role)}
	}
	inter := x509.NewCertPool()
	for _, der := range c.cert.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(ic)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return &LoadError{ID: c.id, File: certFile, Err: fmt.Errorf("Our own certificate failed validation against %s: %w", caFile, err)}
	}
	return nil
}

// ClientConfig returns the configuration of a TLS client (a migration
// source) using these credentials: TLS 1.3 at least; the server's
// certificate checked against ca-cert.pem and hostname (tls-hostname, or
// the host of the migration URI: see [Hostname]) when verify-peer is on;
// this side's client certificate offered when the directory has one.
func (c *X509) ClientConfig(hostname string) (*tls.Config, error) {
	if c.endpoint != Client {
		return nil, fmt.Errorf("Expected TLS credentials for a client endpoint: tls-creds '%s' has endpoint=%s", c.id, c.endpoint)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: c.roots, ServerName: hostname}
	if c.cert != nil {
		// Always offer the certificate, as GnuTLS does. crypto/tls would
		// otherwise send none when the server's list of acceptable CAs
		// does not include ours, and the server could only say "no
		// certificate" instead of naming the unknown issuer.
		cert := c.cert
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	if c.verifyPeer {
		if hostname == "" {
			return nil, errors.New("No hostname available for TLS: set the migration parameter tls-hostname (the migration address has no host name)")
		}
	} else {
		// verify-peer=off: QEMU checks nothing about the server either.
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}

// ServerConfig returns the configuration of a TLS server (a migration
// destination) using these credentials: TLS 1.3 at least, no session
// resumption (every connection is verified in full); with verify-peer a
// client certificate signed by ca-cert.pem is required, checked against
// ca-crl.pem when there is one, and its DN ([DN]) against authz when authz
// is not nil (tls-authz).
//
// Unlike QEMU, which skips the authz check when verify-peer is off,
// ServerConfig refuses that combination: the name in an unverified
// certificate proves nothing.
func (c *X509) ServerConfig(authz Authorizer) (*tls.Config, error) {
	if c.endpoint != Server {
		return nil, fmt.Errorf("Expected TLS credentials for a server endpoint: tls-creds '%s' has endpoint=%s", c.id, c.endpoint)
	}
	if authz != nil && !c.verifyPeer {
		return nil, fmt.Errorf("tls-authz '%s' needs verify-peer=on in tls-creds '%s': the name in an unverified certificate proves nothing", authz.ObjectID(), c.id)
	}
	cfg := &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{*c.cert},
		ClientCAs:              c.roots,
		ClientAuth:             tls.NoClientCert,
		SessionTicketsDisabled: true,
	}
	if !c.verifyPeer {
		return cfg, nil
	}
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return &CertificateError{Reason: NoCertificate}
		}
		leaf := cs.PeerCertificates[0]
		dn, dnErr := DN(leaf)
		if c.revoked(leaf) {
			return &CertificateError{Reason: Revoked, Subject: dn}
		}
		if authz == nil {
			return nil
		}
		if dnErr != nil {
			return &CertificateError{Reason: Invalid, Err: fmt.Errorf("Cannot get client distinguished name: %w", dnErr)}
		}
		if !authz.IsAllowed(dn) {
			return &AuthzError{Authz: authz.ObjectID(), DN: dn}
		}
		return nil
	}
	return cfg, nil
}

// revoked reports whether a CRL of ca-cert.pem's CAs lists cert.
func (c *X509) revoked(cert *x509.Certificate) bool {
	for _, crl := range c.crls {
		if !slices.Equal(crl.RawIssuer, cert.RawIssuer) {
			continue
		}
		for _, e := range crl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(cert.SerialNumber) == 0 {
				return true
			}
		}
	}
	return false
}

// Hostname is the name a migration source checks the destination's
// certificate against: tlsHostname (the tls-hostname parameter) when set,
// else the host of the migration address (for tcp:HOST:PORT). It is
// empty when neither gives one (unix:, fd:, exec:), and ClientConfig then
// refuses with verify-peer on, as QEMU does.
func Hostname(tlsHostname, addrHost string) string {
	if tlsHostname != "" {
		return tlsHostname
	}
	return addrHost
}

// ClientHandshake runs the client side of a TLS handshake over conn,
// bounded by ctx, and returns the TLS connection. Errors are classified
// ([Classify]); a peer that hangs up without answering the ClientHello
// gives a *MismatchError (it probably does not use TLS). On error the
// caller still owns conn and closes it.
//
// With TLS 1.3 the client's handshake completes before the server has
// checked the client's certificate: a refusal by the server (CA, expiry,
// authz) reaches the client as an alert on its first read, which
// [Classify] turns into a *PeerRejectedError.
func ClientHandshake(ctx context.Context, conn net.Conn, cfg *tls.Config) (*tls.Conn, error) {
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("TLS handshake: %w", ctx.Err())
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil, &MismatchError{LocalTLS: true}
		}
		return nil, Classify(err)
	}
	return tc, nil
}

// ServerHandshake runs the server side of a TLS handshake over conn
// (typically the conn Sniff returned), bounded by ctx. Errors are
// classified ([Classify]); on error the caller still owns conn.
func ServerHandshake(ctx context.Context, conn net.Conn, cfg *tls.Config) (*tls.Conn, error) {
	tc := tls.Server(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("TLS handshake: %w", ctx.Err())
		}
		return nil, Classify(err)
	}
	return tc, nil
}
