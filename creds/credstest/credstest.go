// Package credstest makes certificates for tests: a CA, server
// certificates with subject alternative names, client certificates with a
// chosen distinguished name, expired ones, and the files of a QEMU
// tls-creds-x509 directory. Keys are ECDSA P-256; everything is made with
// crypto/x509 in memory, nothing is fetched.
//
// It is normal (non-test) code so that the tests of every package can use
// it, as net/http/httptest is; nothing outside tests should.
package credstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CA is a certificate authority.
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte
}

// Pair is a certificate and its key, issued by a CA.
type Pair struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte // the certificate, then its chain if any
	KeyPEM  []byte // PKCS #8
}

// Options describe a certificate to issue. The zero value is a leaf valid
// from an hour ago for a day, usable by servers and clients.
type Options struct {
	// Subject is the name; RawSubject, when set, is used instead (to
	// control the order and encoding of the RDNs exactly).
	Subject    pkix.Name
	RawSubject []byte
	// DNSNames and IPs are the subject alternative names.
	DNSNames []string
	IPs      []net.IP
	// NotBefore and NotAfter default to now-1h and now+24h.
	NotBefore, NotAfter time.Time
	// Usage restricts the extended key usage (default: server and client
	// authentication).
	Usage []x509.ExtKeyUsage
	// IsCA makes a (sub)CA.
	IsCA bool
}

var serial = big.NewInt(time.Now().UnixNano())

func nextSerial() *big.Int {
	serial = new(big.Int).Add(serial, big.NewInt(1))
	return new(big.Int).Set(serial)
}

// NewCA makes a self-signed CA named cn, valid from an hour ago for a day.
func NewCA(t testing.TB, cn string) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(),
		Subject:               pkix.Name{Country: []string{"GB"}, Organization: []string{"migctl tests"}, CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: pemOf("CERTIFICATE", der)}
}

// Issue signs a certificate described by o.
func (ca *CA) Issue(t testing.TB, o Options) *Pair {
	t.Helper()
	key := newKey(t)
	if o.NotBefore.IsZero() {
		o.NotBefore = time.Now().Add(-time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = time.Now().Add(24 * time.Hour)
	}
	if o.Usage == nil {
		o.Usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(),
		Subject:               o.Subject,
		RawSubject:            o.RawSubject,
		DNSNames:              o.DNSNames,
		IPAddresses:           o.IPs,
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           o.Usage,
		BasicConstraintsValid: true,
		IsCA:                  o.IsCA,
	}
	if o.IsCA {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &Pair{Cert: cert, Key: key, CertPEM: pemOf("CERTIFICATE", der), KeyPEM: pemOf("PRIVATE KEY", kder)}
}

// Server issues a server certificate for hosts: each is an IP SAN if it
// parses as an IP, a DNS SAN otherwise. Its CN is the first host.
func (ca *CA) Server(t testing.TB, hosts ...string) *Pair {
	t.Helper()
	o := Options{Usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	if len(hosts) > 0 {
		o.Subject = pkix.Name{Country: []string{"GB"}, Organization: []string{"migctl tests"}, CommonName: hosts[0]}
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			o.IPs = append(o.IPs, ip)
		} else {
			o.DNSNames = append(o.DNSNames, h)
		}
	}
	return ca.Issue(t, o)
}

// Client issues a client certificate whose subject has the given RDNs, one
// attribute each, in this order: Client(t, "C", "GB", "O", "Example Org",
// "CN", "alice") has the DN "C=GB,O=Example Org,CN=alice" in QEMU's form.
// Names: C, ST, L, O, OU, CN, DC, UID, EMAIL.
func (ca *CA) Client(t testing.TB, typeValue ...string) *Pair {
	t.Helper()
	if len(typeValue)%2 != 0 {
		t.Fatal("credstest.Client: want type, value pairs")
	}
	var seq pkix.RDNSequence
	for i := 0; i < len(typeValue); i += 2 {
		oid, ok := attrOIDs[typeValue[i]]
		if !ok {
			t.Fatalf("credstest.Client: unknown attribute %q", typeValue[i])
		}
		var v any = typeValue[i+1]
		switch typeValue[i] {
		case "DC", "EMAIL":
			v = asn1.RawValue{Tag: asn1.TagIA5String, Bytes: []byte(typeValue[i+1])}
		case "C":
		default:
			v = asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte(typeValue[i+1])}
		}
		seq = append(seq, pkix.RelativeDistinguishedNameSET{{Type: oid, Value: v}})
	}
	raw, err := asn1.Marshal(seq)
	if err != nil {
		t.Fatal(err)
	}
	return ca.Issue(t, Options{RawSubject: raw, Usage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
}

var attrOIDs = map[string]asn1.ObjectIdentifier{
	"C": {2, 5, 4, 6}, "ST": {2, 5, 4, 8}, "L": {2, 5, 4, 7}, "O": {2, 5, 4, 10}, "OU": {2, 5, 4, 11},
	"CN": {2, 5, 4, 3}, "DC": {0, 9, 2342, 19200300, 100, 1, 25}, "UID": {0, 9, 2342, 19200300, 100, 1, 1},
	"EMAIL": {1, 2, 840, 113549, 1, 9, 1},
}

// Expired returns o valid from two days ago until yesterday.
func Expired(o Options) Options {
	o.NotBefore = time.Now().Add(-48 * time.Hour)
	o.NotAfter = time.Now().Add(-24 * time.Hour)
	return o
}

// Dir writes a tls-creds-x509 directory under t.TempDir() with QEMU's file
// names: ca-cert.pem (the CAs' certificates, concatenated), and for each
// of server and client that is not nil its -cert.pem and -key.pem. It
// returns the directory.
func Dir(t testing.TB, cas []*CA, server, client *Pair) string {
	t.Helper()
	dir := t.TempDir()
	var caPEM []byte
	for _, ca := range cas {
		caPEM = append(caPEM, ca.CertPEM...)
	}
	write := func(name string, b []byte, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(dir, name), b, mode); err != nil {
			t.Fatal(err)
		}
	}
	write("ca-cert.pem", caPEM, 0o644)
	if server != nil {
		write("server-cert.pem", server.CertPEM, 0o644)
		write("server-key.pem", server.KeyPEM, 0o600)
	}
	if client != nil {
		write("client-cert.pem", client.CertPEM, 0o644)
		write("client-key.pem", client.KeyPEM, 0o600)
	}
	return dir
}

// CRL writes ca-crl.pem into dir, signed by ca, revoking the given
// certificates.
func (ca *CA) CRL(t testing.TB, dir string, revoked ...*x509.Certificate) {
	t.Helper()
	var entries []x509.RevocationListEntry
	for _, c := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now().Add(-time.Minute)})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    nextSerial(),
		ThisUpdate:                time.Now().Add(-time.Hour),
		NextUpdate:                time.Now().Add(24 * time.Hour),
		RevokedCertificateEntries: entries,
	}, ca.Cert, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-crl.pem"), pemOf("X509 CRL", der), 0o644); err != nil {
		t.Fatal(err)
	}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func pemOf(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
