package creds

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"unicode/utf16"
)

// DN returns the distinguished name of cert's subject in the string form
// QEMU checks authz rules against.
//
// QEMU takes the peer's name with GnuTLS's gnutls_x509_crt_get_dn
// (crypto/tlssession.c), which since GnuTLS 3.5.7 writes the
// "traditional" form, not strict RFC 4514 (GnuTLS NEWS; lib/x509/dn.c,
// flag GNUTLS_X509_DN_FLAG_COMPAT):
//
//   - relative distinguished names in the order the certificate encodes
//     them (RFC 4514 reverses it), joined by "," with no spaces: a
//     certificate made with C, O, CN in that order is
//     "C=GB,O=Example Org,CN=client.example.com";
//   - the attributes of a multi-valued RDN joined by "+";
//   - attribute names as GnuTLS abbreviates them (C, ST, L, O, OU, CN, DC,
//     UID, EMAIL, serialNumber, title, …), the dotted OID for others;
//   - values escaped as RFC 4514 says: a backslash before , + " \ < > ;,
//     before a leading # or space and before a trailing space;
//   - a value GnuTLS does not decode (an unknown OID, or a string with a NUL
//     or of the wrong ASN.1 type) written as # and the hex of its DER
//     encoding, unescaped.
//
// Go's pkix.Name.String is the RFC 4514 form, in the reverse order: it is
// not what QEMU's rules match. DN fails, as GnuTLS does, on a subject that
// does not parse or has an empty DirectoryString value.
func DN(cert *x509.Certificate) (string, error) {
	return formatDN(cert.RawSubject)
}

// dnAttr, dnRDNSET and dnSequence mirror the ASN.1 of a Name while keeping
// each value's raw encoding (encoding/asn1 reads a slice type whose name
// ends in SET as SET OF).
type dnAttr struct {
	Type  asn1.ObjectIdentifier
	Value asn1.RawValue
}

type dnRDNSET []dnAttr

type dnSequence []dnRDNSET

// attrKind is how GnuTLS decodes an attribute's value.
type attrKind int

const (
	dirString attrKind = iota // DirectoryString: a CHOICE of string types
	printableString
	ia5String
	utf8String
	numericString
)

type attrInfo struct {
	name string
	kind attrKind
}

// knownAttrs is the part of GnuTLS's _oid2str table (lib/x509/common.c)
// that can appear in a subject name, with GnuTLS's names.
var knownAttrs = map[string]attrInfo{
	"2.5.4.6":                    {"C", printableString},
	"2.5.4.9":                    {"street", dirString},
	"2.5.4.12":                   {"title", dirString},
	"2.5.4.10":                   {"O", dirString},
	"2.5.4.11":                   {"OU", dirString},
	"2.5.4.3":                    {"CN", dirString},
	"2.5.4.7":                    {"L", dirString},
	"2.5.4.8":                    {"ST", dirString},
	"2.5.4.13":                   {"description", dirString},
	"2.5.4.5":                    {"serialNumber", printableString},
	"2.5.4.20":                   {"telephoneNumber", printableString},
	"2.5.4.4":                    {"surName", dirString},
	"2.5.4.43":                   {"initials", dirString},
	"2.5.4.44":                   {"generationQualifier", dirString},
	"2.5.4.42":                   {"givenName", dirString},
	"2.5.4.65":                   {"pseudonym", dirString},
	"2.5.4.46":                   {"dnQualifier", printableString},
	"2.5.4.17":                   {"postalCode", dirString},
	"2.5.4.41":                   {"name", dirString},
	"2.5.4.15":                   {"businessCategory", dirString},
	"0.9.2342.19200300.100.1.25": {"DC", ia5String},
	"0.9.2342.19200300.100.1.1":  {"UID", dirString},
	"1.2.840.113556.1.4.656":     {"userPrincipalName", dirString},
	"1.3.6.1.4.1.311.60.2.1.1":   {"jurisdictionOfIncorporationLocalityName", dirString},
	"1.3.6.1.4.1.311.60.2.1.2":   {"jurisdictionOfIncorporationStateOrProvinceName", dirString},
	"1.3.6.1.4.1.311.60.2.1.3":   {"jurisdictionOfIncorporationCountryName", printableString},
	"1.2.840.113549.1.9.1":       {"EMAIL", ia5String},
	"1.3.6.1.5.5.7.9.2":          {"placeOfBirth", dirString},
	"1.3.6.1.5.5.7.9.3":          {"gender", printableString},
	"1.3.6.1.5.5.7.9.4":          {"countryOfCitizenship", printableString},
	"1.3.6.1.5.5.7.9.5":          {"countryOfResidence", printableString},
	"1.3.6.1.5.5.7.8.5":          {"XmppAddr", utf8String},
	"1.2.643.100.1":              {"OGRN", numericString},
	"1.2.643.100.3":              {"SNILS", numericString},
	"1.2.643.100.5":              {"OGRNIP", numericString},
	"1.2.643.3.131.1.1":          {"INN", numericString},
}

// errDN: the subject cannot be written as a DN string.
var errDN = errors.New("cannot get the distinguished name")

func formatDN(raw []byte) (string, error) {
	var seq dnSequence
	rest, err := asn1.Unmarshal(raw, &seq)
	if err != nil {
		return "", fmt.Errorf("%w: %v", errDN, err)
	}
	if len(rest) != 0 {
		return "", fmt.Errorf("%w: %d bytes after the name", errDN, len(rest))
	}
	if len(seq) == 0 {
		return "", fmt.Errorf("%w: the subject is empty", errDN)
	}
	var b strings.Builder
	for i, rdn := range seq {
		if i > 0 {
			b.WriteByte(',')
		}
		for j, a := range rdn {
			if j > 0 {
				b.WriteByte('+')
			}
			oid := a.Type.String()
			info, known := knownAttrs[oid]
			if known {
				b.WriteString(info.name)
			} else {
				b.WriteString(oid)
			}
			b.WriteByte('=')
			if known && info.kind == dirString && len(a.Value.FullBytes) >= 2 && a.Value.FullBytes[1] == 0 {
				return "", fmt.Errorf("%w: empty %s value", errDN, info.name)
			}
			v, ok := decodeAttr(info, known, a.Value)
			if !ok {
				b.WriteString("#" + hex.EncodeToString(a.Value.FullBytes))
				continue
			}
			b.WriteString(escapeDNValue(v))
		}
	}
	return b.String(), nil
}

// decodeAttr decodes a value as GnuTLS does; ok is false where GnuTLS
// falls back to the hex of the whole encoding.
func decodeAttr(info attrInfo, known bool, v asn1.RawValue) (string, bool) {
	if !known || v.Class != asn1.ClassUniversal || v.IsCompound {
		return "", false
	}
	var s string
	switch info.kind {
	case dirString:
		switch v.Tag {
		case asn1.TagPrintableString, asn1.TagUTF8String:
			s = string(v.Bytes)
		case asn1.TagT61String:
			// Kept when it is printable ASCII; otherwise GnuTLS writes the
			// hex of the content, which is then escaped like any value.
			if isPrintASCII(v.Bytes) {
				s = string(v.Bytes)
			} else {
				s = "#" + hex.EncodeToString(v.Bytes)
			}
		case asn1.TagBMPString:
			if u, ok := ucs2(v.Bytes); ok {
				s = u
			} else {
				s = "#" + hex.EncodeToString(v.Bytes)
			}
		case 28: // UniversalString: GnuTLS never prints it
			s = "#" + hex.EncodeToString(v.Bytes)
		default:
			return "", false
		}
	case printableString:
		if v.Tag != asn1.TagPrintableString {
			return "", false
		}
		s = string(v.Bytes)
	case ia5String:
		if v.Tag != asn1.TagIA5String {
			return "", false
		}
		s = string(v.Bytes)
	case utf8String:
		if v.Tag != asn1.TagUTF8String {
			return "", false
		}
		s = string(v.Bytes)
	case numericString:
		if v.Tag != asn1.TagNumericString {
			return "", false
		}
		s = string(v.Bytes)
	}
	if strings.IndexByte(s, 0) >= 0 { // GnuTLS refuses strings with a NUL
		return "", false
	}
	return s, true
}

func isPrintASCII(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// ucs2 converts big-endian UCS-2 (BMPString) to UTF-8.
func ucs2(b []byte) (string, bool) {
	if len(b)%2 != 0 {
		return "", false
	}
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = uint16(b[2*i])<<8 | uint16(b[2*i+1])
	}
	for _, r := range utf16.Decode(u) {
		if r == 0xfffd {
			return "", false
		}
	}
	return string(utf16.Decode(u)), true
}

// escapeDNValue is GnuTLS's str_escape (RFC 4514 section 2.4).
func escapeDNValue(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ',' || c == '+' || c == '"' || c == '\\' || c == '<' || c == '>' || c == ';':
			b.WriteByte('\\')
		case i == 0 && (c == '#' || c == ' '):
			b.WriteByte('\\')
		case i == len(s)-1 && c == ' ':
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	return b.String()
}
