package creds

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/migctl/migctl/internal/safe"
)

// maxShown bounds peer-provided text (names, DNs) quoted in messages.
const maxShown = 256

// ErrUnsupported is wrapped by every refusal of an object type or property
// migctl does not implement ([UnsupportedError]).
var ErrUnsupported = errors.New("not supported by migctl")

// UnsupportedError refuses an object type or property, saying why and what
// to use instead.
type UnsupportedError struct {
	What   string // "tls-creds-psk", "property 'priority'", …
	Reason string
}

func (e *UnsupportedError) Error() string { return e.What + " is not supported: " + e.Reason }

// Unwrap returns ErrUnsupported.
func (e *UnsupportedError) Unwrap() error { return ErrUnsupported }

// LoadError is a credentials file that cannot be used.
type LoadError struct {
	ID   string // the tls-creds object's id
	File string
	Err  error
}

func (e *LoadError) Error() string {
	return fmt.Sprintf("tls-creds-x509 '%s': %s: %v", e.ID, e.File, e.Err)
}

func (e *LoadError) Unwrap() error { return e.Err }

// Reason says what was wrong with a peer's certificate.
type Reason int

// Reasons a certificate is refused.
const (
	// UnknownAuthority: signed by a CA that is not in ca-cert.pem.
	UnknownAuthority Reason = iota + 1
	// Expired: past its notAfter.
	Expired
	// NotYetValid: before its notBefore.
	NotYetValid
	// HostnameMismatch: the server's certificate does not name the host
	// the client checked (tls-hostname, or the migration URI's host).
	HostnameMismatch
	// NoCertificate: the client sent none and the server verifies peers.
	NoCertificate
	// Revoked: listed in the server's ca-crl.pem.
	Revoked
	// Invalid: anything else crypto/x509 refuses.
	Invalid
)

// CertificateError is this side refusing the peer's certificate during the
// TLS handshake. The message starts with QEMU's wording for the same
// failure (crypto/tlssession.c) and says what to change.
type CertificateError struct {
	Reason  Reason
	Subject string    // the certificate's DN ([DN]); "" when there was none
	Host    string    // HostnameMismatch: the name that was checked
	Names   []string  // HostnameMismatch: the names the certificate has
	When    time.Time // Expired, NotYetValid: notAfter or notBefore
	Err     error     // the crypto/x509 or crypto/tls error
}

func (e *CertificateError) Error() string {
	peer := "the peer's certificate"
	if e.Subject != "" {
		peer += " (" + safe.Printable(e.Subject, maxShown) + ")"
	}
	switch e.Reason {
	case UnknownAuthority:
		return "TLS: The certificate hasn't got a known issuer: " + peer + " is not signed by a CA in this side's ca-cert.pem; add its CA there, or issue the peer a certificate from this side's CA"
	case Expired:
		return fmt.Sprintf("TLS: The certificate has expired: %s expired at %s; issue the peer a new one", peer, e.When.UTC().Format(time.RFC3339))
	case NotYetValid:
		return fmt.Sprintf("TLS: The certificate is not yet activated: %s is valid from %s; check both hosts' clocks", peer, e.When.UTC().Format(time.RFC3339))
	case HostnameMismatch:
		return fmt.Sprintf("TLS: Certificate does not match the hostname %s: %s is for %s; set tls-hostname to one of those names, or issue a certificate for %s",
			safe.Printable(e.Host, maxShown), peer, safe.Printable(strings.Join(e.Names, ", "), maxShown), safe.Printable(e.Host, maxShown))
	case NoCertificate:
		return "TLS: No certificate peers: the client sent no certificate and verify-peer is on here; put client-cert.pem and client-key.pem in the client's tls-creds directory"
	case Revoked:
		return "TLS: The certificate has been revoked: " + peer + " is listed in this side's ca-crl.pem"
	default:
		return "TLS: Invalid certificate: " + peer + ": " + safe.Printable(fmt.Sprint(e.Err), maxShown)
	}
}

func (e *CertificateError) Unwrap() error { return e.Err }

// AuthzError is the authorization object denying a peer whose certificate
// is otherwise valid.
type AuthzError struct {
	Authz string // the authz object's id
	DN    string // the peer's DN, as the rules saw it
}

func (e *AuthzError) Error() string {
	return fmt.Sprintf("TLS x509 authz check for %s is denied: %s '%s' allows no such peer; add a rule that matches this distinguished name (exactly as written here)",
		safe.Printable(e.DN, maxShown), "authz object", safe.Printable(e.Authz, maxShown))
}

// PeerRejectedError is the peer refusing this side during the handshake:
// it sent a TLS alert. With TLS 1.3 a client whose certificate the server
// refuses finishes its own handshake first and reads the alert on its first
// read, so this error can come from a Read after a successful handshake
// (see [Classify]).
type PeerRejectedError struct {
	Alert string // the alert's text, e.g. "unknown certificate authority"
	Err   error
}

func (e *PeerRejectedError) Error() string {
	hint := "the peer's log says why"
	switch e.Alert {
	case "unknown certificate authority":
		hint = "the peer does not trust the CA that signed this side's certificate: check the peer's ca-cert.pem"
	case "expired certificate":
		hint = "the peer says this side's certificate has expired: issue a new one"
	case "bad certificate":
		hint = "the peer refused this side's certificate or identity (its CA, hostname or authz check); the peer's log says which"
	case "certificate required":
		hint = "the peer requires a client certificate: put client-cert.pem and client-key.pem in this side's tls-creds directory"
	case "protocol version not supported":
		hint = "the peer does not speak TLS 1.3"
	}
	return "TLS: the peer refused the handshake (" + e.Alert + "): " + hint
}

func (e *PeerRejectedError) Unwrap() error { return e.Err }

// MismatchError is TLS on one side and plaintext on the other, as seen
// from the first bytes ([Sniff]) or from a handshake the peer did not
// answer.
type MismatchError struct {
	LocalTLS bool   // whether this side wants TLS
	Peer     Kind   // what the peer sent (KindUnknown: nothing usable)
	Head     []byte // the peer's first bytes, when known
}

func (e *MismatchError) Error() string {
	switch {
	case e.LocalTLS && (e.Peer == KindStream || e.Peer == KindMultifd):
		return fmt.Sprintf("TLS required: tls-creds is set here but the peer sent %s in plaintext; set tls-creds on the source as well, or clear it here", e.Peer)
	case !e.LocalTLS && e.Peer == KindTLS:
		return "TLS not configured: the peer started a TLS handshake (a TLS ClientHello) but tls-creds is not set here; set tls-creds here as well, or clear it on the source"
	case e.LocalTLS && len(e.Head) > 0:
		return fmt.Sprintf("TLS required: tls-creds is set here but the peer sent no TLS ClientHello (first bytes % x)", e.Head)
	case e.LocalTLS:
		return "TLS handshake failed: the peer closed the connection without answering the TLS ClientHello; it probably does not use TLS (no tls-creds), or it refused this connection"
	default:
		return fmt.Sprintf("the peer sent neither a TLS ClientHello nor a migration stream (first bytes % x %q)", e.Head, safe.Printable(string(e.Head), 16))
	}
}

// Classify turns an error from a TLS handshake, or from the first reads
// and writes after it, into one of this package's typed errors where the
// cause is known: *CertificateError, *AuthzError, *PeerRejectedError or
// *MismatchError (this side, having run a handshake, is the one using
// TLS). Other errors are returned unchanged.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	var (
		ce   *CertificateError
		ae   *AuthzError
		pe   *PeerRejectedError
		me   *MismatchError
		cve  *tls.CertificateVerificationError
		rhe  tls.RecordHeaderError
		oerr *net.OpError
	)
	switch {
	case errors.As(err, &ce), errors.As(err, &ae), errors.As(err, &pe), errors.As(err, &me):
		return err
	case errors.As(err, &cve):
		return certError(cve)
	case errors.As(err, &rhe):
		return &MismatchError{LocalTLS: true, Peer: KindOf(rhe.RecordHeader[:4]), Head: rhe.RecordHeader[:]}
	case errors.As(err, &oerr) && oerr.Op == "remote error":
		return &PeerRejectedError{Alert: strings.TrimPrefix(oerr.Err.Error(), "tls: "), Err: err}
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		// crypto/tls's text when ClientAuth requires a certificate and
		// the client sent none (handshake_server.go).
		return &CertificateError{Reason: NoCertificate, Err: err}
	}
	return err
}

// certError classifies a failed chain verification.
func certError(cve *tls.CertificateVerificationError) error {
	e := &CertificateError{Reason: Invalid, Err: cve}
	var leaf *x509.Certificate
	if len(cve.UnverifiedCertificates) > 0 {
		leaf = cve.UnverifiedCertificates[0]
		e.Subject, _ = DN(leaf)
	}
	var (
		ua x509.UnknownAuthorityError
		he x509.HostnameError
		ci x509.CertificateInvalidError
	)
	switch {
	case errors.As(cve.Err, &ua):
		e.Reason = UnknownAuthority
	case errors.As(cve.Err, &he):
		e.Reason = HostnameMismatch
		e.Host = he.Host
		if he.Certificate != nil {
			e.Names = append(e.Names, he.Certificate.DNSNames...)
			for _, ip := range he.Certificate.IPAddresses {
				e.Names = append(e.Names, ip.String())
			}
		}
	case errors.As(cve.Err, &ci) && ci.Reason == x509.Expired:
		// x509 says Expired for both ends of the validity period.
		e.Reason = Expired
		if ci.Cert != nil {
			e.Subject, _ = DN(ci.Cert)
			e.When = ci.Cert.NotAfter
			if time.Now().Before(ci.Cert.NotBefore) {
				e.Reason, e.When = NotYetValid, ci.Cert.NotBefore
			}
		}
	}
	return e
}
