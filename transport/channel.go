package transport

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
)

// MigrationAddress mirrors QMP's MigrationAddress: a union discriminated by
// Transport ("socket", "exec", "rdma", "file"); a socket address is in turn
// discriminated by Type ("inet", "unix", "vsock", "fd"). Members are flat, as
// on the wire:
//
//	{"transport":"socket","type":"inet","host":"10.0.0.2","port":"4446"}
//	{"transport":"socket","type":"unix","path":"/run/mig.sock"}
//	{"transport":"socket","type":"vsock","cid":"3","port":"4446"}
//	{"transport":"socket","type":"fd","str":"migfd"}
//	{"transport":"exec","args":["/bin/nc","-l","4446"]}
//	{"transport":"rdma","host":"10.0.0.2","port":"4446"}
//	{"transport":"file","filename":"/var/mig","offset":4096}
//
// As in QEMU, ports and CIDs are strings. The inet options (numeric, to,
// ipv4, ipv6, keep-alive, mptcp) and the unix options (abstract, tight) are
// accepted so that QEMU clients' objects decode; FromChannel rejects those it
// cannot honour and ignores the rest (see FromChannel).
type MigrationAddress struct {
	Transport string `json:"transport"`

	// socket
	Type string `json:"type,omitempty"`
	// socket inet and vsock, rdma
	Host      string  `json:"host,omitempty"`
	Port      string  `json:"port,omitempty"`
	Numeric   *bool   `json:"numeric,omitempty"`
	To        *uint16 `json:"to,omitempty"`
	IPv4      *bool   `json:"ipv4,omitempty"`
	IPv6      *bool   `json:"ipv6,omitempty"`
	KeepAlive *bool   `json:"keep-alive,omitempty"`
	MPTCP     *bool   `json:"mptcp,omitempty"`
	// socket unix
	Path     string `json:"path,omitempty"`
	Abstract *bool  `json:"abstract,omitempty"`
	Tight    *bool  `json:"tight,omitempty"`
	// socket vsock
	CID string `json:"cid,omitempty"`
	// socket fd
	Str string `json:"str,omitempty"`

	// exec
	Args []string `json:"args,omitempty"`

	// file
	Filename string  `json:"filename,omitempty"`
	Offset   *uint64 `json:"offset,omitempty"`
}

// MigrationChannel mirrors QMP's MigrationChannel, an element of the
// "channels" argument of migrate and migrate-incoming.
type MigrationChannel struct {
	ChannelType string           `json:"channel-type"` // "main" or "cpr"
	Addr        MigrationAddress `json:"addr"`
}

// DecodeMigrationAddress decodes QMP's MigrationAddress JSON object strictly:
// an unknown member is an error, as it is for QEMU's input visitor.
func DecodeMigrationAddress(data []byte) (MigrationAddress, error) {
	var m MigrationAddress
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return MigrationAddress{}, fmt.Errorf("MigrationAddress: %w", err)
	}
	if dec.More() {
		return MigrationAddress{}, errors.New("MigrationAddress: trailing data after the JSON object")
	}
	return m, nil
}

// FromChannel converts a QMP MigrationAddress into an Addr, checking it as
// Parse checks a URI. Options that change where or how a socket connects and
// that this package does not implement are rejected rather than silently
// dropped: "to" (port ranges), "ipv4"/"ipv6" set to false, "mptcp": true,
// "abstract": true. "numeric" and "keep-alive" are ignored ("numeric" only
// skips a DNS lookup for what must already be a literal; keep-alive is a
// tuning the caller can apply through Unwrap).
func FromChannel(m MigrationAddress) (Addr, error) {
	switch m.Transport {
	case "socket":
		switch m.Type {
		case "inet":
			return inetFromChannel(SchemeTCP, m)
		case "unix":
			if m.Abstract != nil && *m.Abstract {
				return Addr{}, fmt.Errorf("%w: abstract unix sockets (\"abstract\": true) are not implemented; use a filesystem path", ErrUnsupported)
			}
			if err := checkUnixPath(m.Path); err != nil {
				return Addr{}, err
			}
			return Addr{Scheme: SchemeUnix, Path: m.Path}, nil
		case "vsock":
			a, err := parseVsock(m.CID + ":" + m.Port)
			if err != nil {
				return Addr{}, fmt.Errorf("socket vsock: cid %q port %q: %w", m.CID, m.Port, err)
			}
			return a, nil
		case "fd":
			return parseFD(m.Str)
		case "":
			return Addr{}, errors.New(`MigrationAddress: "transport": "socket" needs "type": one of inet, unix, vsock, fd`)
		}
		return Addr{}, fmt.Errorf("MigrationAddress: unknown socket type %q; want inet, unix, vsock or fd", m.Type)
	case "rdma":
		return inetFromChannel(SchemeRDMA, m)
	case "exec":
		if len(m.Args) == 0 || m.Args[0] == "" {
			return Addr{}, errors.New(`MigrationAddress: "transport": "exec" needs "args" with the program first`)
		}
		return Addr{Scheme: SchemeExec, Args: append([]string(nil), m.Args...)}, nil
	case "file":
		var off int64
		if m.Offset != nil {
			if *m.Offset > math.MaxInt64 {
				return Addr{}, fmt.Errorf("file URI has bad offset %d: Numerical result out of range", *m.Offset)
			}
			off = int64(*m.Offset)
		}
		// The filename is taken verbatim: a ",offset=" inside it is part of
		// the name, not an option.
		a := Addr{Scheme: SchemeFile, Path: m.Filename, Offset: off}
		if err := a.validate(); err != nil {
			return Addr{}, err
		}
		return a, nil
	case "":
		return Addr{}, errors.New(`MigrationAddress: missing "transport": one of socket, exec, rdma, file`)
	}
	return Addr{}, fmt.Errorf("MigrationAddress: unknown transport %q; want socket, exec, rdma or file", m.Transport)
}

// inetFromChannel converts the InetSocketAddress members.
func inetFromChannel(scheme string, m MigrationAddress) (Addr, error) {
	switch {
	case m.To != nil:
		return Addr{}, fmt.Errorf(`%w: the "to" port range is not implemented; give one port`, ErrUnsupported)
	case m.IPv4 != nil && !*m.IPv4, m.IPv6 != nil && !*m.IPv6:
		return Addr{}, fmt.Errorf(`%w: "ipv4"/"ipv6": false is not implemented; give an address of the family you want`, ErrUnsupported)
	case m.MPTCP != nil && *m.MPTCP:
		return Addr{}, fmt.Errorf(`%w: "mptcp": true is not implemented`, ErrUnsupported)
	}
	if err := checkHost(m.Host); err != nil {
		if _, ipErr := parseIPv6(m.Host); ipErr != nil {
			return Addr{}, fmt.Errorf("%s host %q: %v", scheme, m.Host, err)
		}
	}
	port, err := parsePort(m.Port, math.MaxUint16)
	if err != nil {
		return Addr{}, fmt.Errorf("%s host %q: %v", scheme, m.Host, err)
	}
	return Addr{Scheme: scheme, Host: m.Host, Port: port}, nil
}

// ToChannel converts a into QMP's MigrationAddress, the inverse of
// FromChannel.
func ToChannel(a Addr) MigrationAddress {
	switch a.Scheme {
	case SchemeTCP:
		return MigrationAddress{Transport: "socket", Type: "inet", Host: a.Host, Port: strconv.Itoa(a.Port)}
	case SchemeRDMA:
		return MigrationAddress{Transport: "rdma", Host: a.Host, Port: strconv.Itoa(a.Port)}
	case SchemeUnix:
		return MigrationAddress{Transport: "socket", Type: "unix", Path: a.Path}
	case SchemeVsock:
		return MigrationAddress{Transport: "socket", Type: "vsock",
			CID: strconv.FormatUint(uint64(a.CID), 10), Port: strconv.Itoa(a.Port)}
	case SchemeFD:
		s := a.FDName
		if s == "" {
			s = strconv.Itoa(a.FD)
		}
		return MigrationAddress{Transport: "socket", Type: "fd", Str: s}
	case SchemeExec:
		return MigrationAddress{Transport: "exec", Args: append([]string(nil), a.Args...)}
	case SchemeFile:
		off := uint64(a.Offset)
		return MigrationAddress{Transport: "file", Filename: a.Path, Offset: &off}
	}
	return MigrationAddress{Transport: a.Scheme}
}
