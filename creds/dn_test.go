package creds

import (
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"testing"

	"github.com/migctl/migctl/creds/credstest"
)

var (
	oidC     = asn1.ObjectIdentifier{2, 5, 4, 6}
	oidO     = asn1.ObjectIdentifier{2, 5, 4, 10}
	oidOU    = asn1.ObjectIdentifier{2, 5, 4, 11}
	oidCN    = asn1.ObjectIdentifier{2, 5, 4, 3}
	oidDC    = asn1.ObjectIdentifier{0, 9, 2342, 19200300, 100, 1, 25}
	oidEmail = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}
	oidOther = asn1.ObjectIdentifier{1, 2, 3, 4}
)

func utf8v(s string) asn1.RawValue { return asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte(s)} }
func print(s string) asn1.RawValue {
	return asn1.RawValue{Tag: asn1.TagPrintableString, Bytes: []byte(s)}
}
func ia5(s string) asn1.RawValue { return asn1.RawValue{Tag: asn1.TagIA5String, Bytes: []byte(s)} }
func t61(b []byte) asn1.RawValue { return asn1.RawValue{Tag: asn1.TagT61String, Bytes: b} }
func bmp(b []byte) asn1.RawValue { return asn1.RawValue{Tag: asn1.TagBMPString, Bytes: b} }
func attr(oid asn1.ObjectIdentifier, v any) pkix.AttributeTypeAndValue {
	return pkix.AttributeTypeAndValue{Type: oid, Value: v}
}

func rdns(sets ...pkix.RelativeDistinguishedNameSET) []byte {
	raw, err := asn1.Marshal(pkix.RDNSequence(sets))
	if err != nil {
		panic(err)
	}
	return raw
}

func one(a pkix.AttributeTypeAndValue) pkix.RelativeDistinguishedNameSET {
	return pkix.RelativeDistinguishedNameSET{a}
}

// TestDN: the DN string QEMU matches authz rules against, as GnuTLS's
// gnutls_x509_crt_get_dn writes it (expected strings written by hand from
// GnuTLS's rules: lib/x509/dn.c, lib/x509/common.c).
func TestDN(t *testing.T) {
	cases := []struct {
		name string
		raw  []byte
		want string
	}{
		{"certificate order, not RFC 4514's reverse",
			rdns(one(attr(oidC, print("GB"))), one(attr(oidO, utf8v("Example Org"))), one(attr(oidCN, utf8v("client.example.com")))),
			"C=GB,O=Example Org,CN=client.example.com"},
		{"CN first when the certificate puts it first",
			rdns(one(attr(oidCN, utf8v("x"))), one(attr(oidO, utf8v("y")))),
			"CN=x,O=y"},
		{"multi-valued RDN joined by +, in its DER (sorted) order",
			rdns(pkix.RelativeDistinguishedNameSET{attr(oidOU, utf8v("a")), attr(oidCN, utf8v("b"))}, one(attr(oidC, print("FR")))),
			"CN=b+OU=a,C=FR"},
		{"RFC 4514 special characters escaped",
			rdns(one(attr(oidCN, utf8v(`a,b+c"d\e<f>g;h`)))),
			`CN=a\,b\+c\"d\\e\<f\>g\;h`},
		{"leading # and space, trailing space",
			rdns(one(attr(oidCN, utf8v("#x"))), one(attr(oidO, utf8v(" y "))), one(attr(oidOU, utf8v("a b")))),
			`CN=\#x,O=\ y\ ,OU=a b`},
		{"= is not escaped", rdns(one(attr(oidCN, utf8v("a=b")))), "CN=a=b"},
		{"UTF-8 kept as it is", rdns(one(attr(oidCN, utf8v("Zoë 名前")))), "CN=Zoë 名前"},
		{"DC and EMAIL are IA5", rdns(one(attr(oidDC, ia5("example"))), one(attr(oidEmail, ia5("a@b.example")))), "DC=example,EMAIL=a@b.example"},
		{"unknown OID: hex of the DER value", rdns(one(attr(oidOther, utf8v("x")))), "1.2.3.4=#0c0178"},
		{"C of the wrong string type: hex", rdns(one(attr(oidC, utf8v("GB")))), "C=#0c024742"},
		{"a NUL in a value: hex", rdns(one(attr(oidCN, utf8v("a\x00b")))), "CN=#0c03610062"},
		{"printable TeletexString kept", rdns(one(attr(oidCN, t61([]byte("abc"))))), "CN=abc"},
		{"other TeletexString: hex of the content, escaped", rdns(one(attr(oidCN, t61([]byte{0xe9})))), `CN=\#e9`},
		{"BMPString converted to UTF-8", rdns(one(attr(oidCN, bmp([]byte{0x00, 'h', 0x00, 0xe9})))), "CN=hé"},
		{"odd BMPString: hex of the content", rdns(one(attr(oidCN, bmp([]byte{0x00, 'h', 0x00})))), `CN=\#006800`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := formatDN(tc.raw)
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v\nwant %q", got, err, tc.want)
			}
		})
	}
	for name, raw := range map[string][]byte{
		"empty DirectoryString": rdns(one(attr(oidCN, utf8v("")))),
		"empty name":            rdns(),
		"not DER":               {0x30, 0x05, 0x01},
		"trailing bytes":        append(rdns(one(attr(oidCN, utf8v("x")))), 0),
	} {
		if got, err := formatDN(raw); !errors.Is(err, errDN) {
			t.Errorf("%s: got %q, %v; want an error", name, got, err)
		}
	}
}

// TestDNOfIssuedCertificate: DN reads a real certificate's subject in the
// order credstest wrote it.
func TestDNOfIssuedCertificate(t *testing.T) {
	ca := credstest.NewCA(t, "ca")
	p := ca.Client(t, "DC", "org", "DC", "example", "OU", "hosts", "CN", "src+1")
	got, err := DN(p.Cert)
	if want := `DC=org,DC=example,OU=hosts,CN=src\+1`; err != nil || got != want {
		t.Fatalf("DN = %q, %v; want %q", got, err, want)
	}
	// Go's own String is the reverse (RFC 4514): not what QEMU matches.
	if s := p.Cert.Subject.String(); s == got {
		t.Fatalf("pkix.Name.String() unexpectedly equals QEMU's form: %q", s)
	}
}

// FuzzDN: any bytes as a subject: no panic, and a DN only from a subject
// that parses.
func FuzzDN(f *testing.F) {
	f.Add(rdns(one(attr(oidC, print("GB"))), one(attr(oidCN, utf8v("x")))))
	f.Add(rdns(pkix.RelativeDistinguishedNameSET{attr(oidOU, bmp([]byte{0xd8, 0x00})), attr(oidOther, 5)}))
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, raw []byte) {
		s, err := formatDN(raw)
		if err == nil && s == "" {
			t.Fatalf("empty DN without error for % x", raw)
		}
		if err != nil && !errors.Is(err, errDN) {
			t.Fatalf("untyped error %v", err)
		}
	})
}
