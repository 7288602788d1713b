package transport

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
)

// Scheme names: the part of a migration URI before the first colon, and the
// key the spec's transport rules use.
const (
	SchemeTCP   = "tcp"
	SchemeUnix  = "unix"
	SchemeFD    = "fd"
	SchemeFile  = "file"
	SchemeExec  = "exec"
	SchemeRDMA  = "rdma"
	SchemeVsock = "vsock"
)

// Limits applied while parsing. They bound what a hostile URI can make us
// hold and reject names the kernel would refuse later with a vaguer error.
const (
	maxUnixPath = 107 // sun_path is 108 bytes including the terminating NUL
	maxHostLen  = 253 // longest DNS name
	maxFDName   = 255 // QEMU's getfd names are short identifiers
	maxURILen   = 64 << 10
)

// shellArgv0 and shellFlag are what an exec: URI runs its command line with,
// as QEMU does on POSIX hosts.
const (
	shellArgv0 = "/bin/sh"
	shellFlag  = "-c"
)

// Addr is a parsed migration address. Scheme says which fields mean
// something:
//
//	tcp, rdma  Host, Port  (Host "" listens on every interface; Port 0 lets
//	                        the kernel choose when listening)
//	unix       Path
//	fd         FD, or FDName (FD is -1) for a descriptor registered by name
//	file       Path, Offset
//	exec       Args (the argv; an exec: URI gives /bin/sh -c CMDLINE)
//	vsock      CID, Port
//
// The zero value is not a valid address. Build one with [Parse] or
// [FromChannel], or fill the fields for Scheme by hand.
type Addr struct {
	Scheme string   // one of the Scheme constants
	Host   string   // tcp, rdma: host name or IP literal, without brackets
	Port   int      // tcp, rdma: 0..65535; vsock: 0..2^32-1
	CID    uint32   // vsock: context id
	Path   string   // unix: socket path; file: file path
	FD     int      // fd: descriptor number, -1 when FDName is set
	FDName string   // fd: name of a descriptor registered with the monitor (getfd)
	Offset int64    // file: byte offset where the stream starts
	Args   []string // exec: argv, Args[0] is the program
}

// String returns the canonical URI for a. For an exec address whose Args are
// not the /bin/sh -c form, it returns an exec: URI whose shell command runs
// the same argv (each argument single-quoted).
func (a Addr) String() string {
	switch a.Scheme {
	case SchemeTCP, SchemeRDMA:
		return a.Scheme + ":" + joinHostPort(a.Host, a.Port)
	case SchemeUnix:
		return "unix:" + a.Path
	case SchemeFD:
		if a.FDName != "" {
			return "fd:" + a.FDName
		}
		return "fd:" + strconv.Itoa(a.FD)
	case SchemeFile:
		if a.Offset != 0 {
			return "file:" + a.Path + ",offset=" + strconv.FormatInt(a.Offset, 10)
		}
		return "file:" + a.Path
	case SchemeExec:
		if cmd, ok := shellCommand(a.Args); ok {
			return "exec:" + cmd
		}
		return "exec:" + shellQuote(a.Args)
	case SchemeVsock:
		return "vsock:" + strconv.FormatUint(uint64(a.CID), 10) + ":" + strconv.Itoa(a.Port)
	}
	return a.Scheme + ":"
}

// joinHostPort writes host:port, bracketing an IPv6 literal.
func joinHostPort(host string, port int) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + strconv.Itoa(port)
	}
	return host + ":" + strconv.Itoa(port)
}

// shellCommand reports whether args is the /bin/sh -c CMDLINE form an exec:
// URI produces, and returns CMDLINE.
func shellCommand(args []string) (string, bool) {
	if len(args) == 3 && args[0] == shellArgv0 && args[1] == shellFlag {
		return args[2], true
	}
	return "", false
}

// shellQuote single-quotes each argument so that /bin/sh -c runs exactly args.
func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, s := range args {
		q[i] = "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// Parse parses a migration URI in QEMU's syntax:
//
//	tcp:HOST:PORT       tcp:10.0.0.2:4446, tcp:[::1]:4446, tcp:host.example:0, tcp::4446
//	unix:PATH           unix:/run/mig.sock
//	fd:N | fd:NAME      fd:7, or a name registered with getfd (resolved by Config.ResolveFD)
//	file:PATH[,offset=N]  N in bytes: decimal with an optional K/M/G/T/P/E suffix, or 0x hex
//	exec:CMDLINE        run with /bin/sh -c CMDLINE
//	rdma:HOST:PORT      parsed; not opened yet (ErrUnsupported)
//	vsock:CID:PORT      parsed; not opened yet (ErrUnsupported)
//
// Errors carry QEMU's wording where QEMU has one: an unknown scheme gives
// "unknown migration protocol: URI", a bad offset "file URI has bad offset
// N: Invalid argument". Socket options after a comma (tcp:h:p,ipv4=on) are
// not accepted.
func Parse(uri string) (Addr, error) {
	if len(uri) > maxURILen {
		return Addr{}, fmt.Errorf("migration URI is %d bytes long; the limit is %d", len(uri), maxURILen)
	}
	scheme, rest, ok := strings.Cut(uri, ":")
	if !ok {
		return Addr{}, fmt.Errorf("unknown migration protocol: %s", uri)
	}
	switch scheme {
	case SchemeTCP, SchemeRDMA:
		host, port, err := parseInet(rest)
		if err != nil {
			return Addr{}, err
		}
		return Addr{Scheme: scheme, Host: host, Port: port}, nil
	case SchemeUnix:
		if err := checkUnixPath(rest); err != nil {
			return Addr{}, err
		}
		return Addr{Scheme: SchemeUnix, Path: rest}, nil
	case SchemeFD:
		return parseFD(rest)
	case SchemeFile:
		return parseFile(rest)
	case SchemeExec:
		if strings.TrimSpace(rest) == "" {
			return Addr{}, errors.New("exec: migration URI has an empty command line; write exec:CMDLINE, e.g. exec:cat > /tmp/mig")
		}
		if strings.IndexByte(rest, 0) >= 0 {
			return Addr{}, errors.New("exec: command line contains a NUL byte")
		}
		return Addr{Scheme: SchemeExec, Args: []string{shellArgv0, shellFlag, rest}}, nil
	case SchemeVsock:
		return parseVsock(rest)
	}
	return Addr{}, fmt.Errorf("unknown migration protocol: %s", uri)
}

// parseInet parses HOST:PORT as QEMU's inet_parse does: an IPv6 literal in
// brackets, otherwise a host name or IPv4 address up to the first colon, or
// nothing at all (":PORT", every interface).
func parseInet(s string) (host string, port int, err error) {
	if i := strings.IndexByte(s, ','); i >= 0 {
		return "", 0, fmt.Errorf("error parsing address '%s': socket options after ',' (%s) are not supported", s, s[i+1:])
	}
	var portStr string
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 || end+1 >= len(s) || s[end+1] != ':' {
			return "", 0, fmt.Errorf("error parsing IPv6 address '%s': write it as [ADDRESS]:PORT", s)
		}
		host, portStr = s[1:end], s[end+2:]
		if _, err := parseIPv6(host); err != nil {
			return "", 0, fmt.Errorf("error parsing IPv6 address '%s': %q is not an IPv6 address", s, host)
		}
	} else {
		var ok bool
		host, portStr, ok = strings.Cut(s, ":")
		if !ok {
			return "", 0, fmt.Errorf("error parsing address '%s': expected HOST:PORT", s)
		}
		if strings.Contains(portStr, ":") {
			return "", 0, fmt.Errorf("error parsing address '%s': an IPv6 address needs brackets, e.g. [::1]:4446", s)
		}
		if err := checkHost(host); err != nil {
			return "", 0, fmt.Errorf("error parsing address '%s': %v", s, err)
		}
	}
	port, err = parsePort(portStr, math.MaxUint16)
	if err != nil {
		return "", 0, fmt.Errorf("error parsing port in address '%s': %v", s, err)
	}
	return host, port, nil
}

// checkHost accepts a host name or IPv4 literal: letters, digits, '-', '.',
// '_' (seen in real-world names), at most 253 bytes. "" means any interface.
func checkHost(h string) error {
	if len(h) > maxHostLen {
		return fmt.Errorf("host name is %d bytes long; the limit is %d", len(h), maxHostLen)
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("host %q contains %q, which is not allowed in a host name", h, c)
		}
	}
	return nil
}

// parsePort parses a decimal port number no larger than max.
func parsePort(s string, max uint64) (int, error) {
	if s == "" {
		return 0, errors.New("missing port number")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("port %q is not a decimal number (service names are not accepted)", s)
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > max {
		return 0, fmt.Errorf("port %s is out of range 0..%d", s, max)
	}
	return int(n), nil
}

// checkUnixPath rejects paths the kernel cannot bind or connect to.
func checkUnixPath(p string) error {
	if p == "" {
		return errors.New("invalid Unix socket address: write unix:PATH, e.g. unix:/run/migration.sock")
	}
	if len(p) > maxUnixPath {
		return fmt.Errorf("UNIX socket path '%s' is too long: %d bytes, it must be less than 108", p, len(p))
	}
	if strings.IndexByte(p, 0) >= 0 {
		return errors.New("unix: socket path contains a NUL byte")
	}
	return nil
}

// parseFD parses the part after "fd:": a descriptor number, or a name
// registered with QEMU's getfd. As in QEMU, text starting with a digit must
// be a number.
func parseFD(s string) (Addr, error) {
	if s == "" {
		return Addr{}, errors.New("invalid file descriptor: write fd:N or fd:NAME")
	}
	if s[0] >= '0' && s[0] <= '9' {
		n, err := strconv.ParseUint(s, 10, 31)
		if err != nil {
			return Addr{}, fmt.Errorf("Invalid file descriptor number '%s'", s)
		}
		return Addr{Scheme: SchemeFD, FD: int(n)}, nil
	}
	if len(s) > maxFDName {
		return Addr{}, fmt.Errorf("fd: descriptor name is %d bytes long; the limit is %d", len(s), maxFDName)
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] == 0x7f {
			return Addr{}, fmt.Errorf("fd: descriptor name %q contains a space or control character", s)
		}
	}
	return Addr{Scheme: SchemeFD, FD: -1, FDName: s}, nil
}

// offsetOption separates the path from the offset in a file: URI. As in
// QEMU, its first occurrence splits the two.
const offsetOption = ",offset="

// parseFile parses the part after "file:".
func parseFile(s string) (Addr, error) {
	path, off := s, int64(0)
	if i := strings.Index(s, offsetOption); i >= 0 {
		path = s[:i]
		var err error
		if off, err = parseOffset(s[i+len(offsetOption):]); err != nil {
			return Addr{}, err
		}
	}
	if path == "" {
		return Addr{}, errors.New("file: migration URI has no path; write file:PATH[,offset=N]")
	}
	if strings.IndexByte(path, 0) >= 0 {
		return Addr{}, errors.New("file: path contains a NUL byte")
	}
	return Addr{Scheme: SchemeFile, Path: path, Offset: off}, nil
}

// parseOffset parses a file: offset as QEMU's qemu_strtosz does for whole
// numbers: decimal with an optional binary suffix (B, K, M, G, T, P, E; either
// case), or 0x hex without a suffix. Fractions ("1.5M") are not accepted. The
// result must fit an int64, the range of a file offset.
func parseOffset(s string) (int64, error) {
	bad := func(reason string) error { return fmt.Errorf("file URI has bad offset %s: %s", s, reason) }
	const einval, erange = "Invalid argument", "Numerical result out of range"
	if s == "" {
		return 0, bad(einval)
	}
	var v uint64
	var err error
	if len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		digits := s[2:]
		if strings.ContainsAny(digits[:1], "+-") {
			return 0, bad(einval)
		}
		v, err = strconv.ParseUint(digits, 16, 64)
	} else {
		digits := s
		mul := uint64(1)
		if m, ok := suffixMul(s[len(s)-1]); ok {
			digits, mul = s[:len(s)-1], m
		}
		if digits == "" || digits[0] < '0' || digits[0] > '9' {
			return 0, bad(einval)
		}
		v, err = strconv.ParseUint(digits, 10, 64)
		if err == nil {
			if v > math.MaxUint64/mul {
				return 0, bad(erange)
			}
			v *= mul
		}
	}
	if errors.Is(err, strconv.ErrRange) {
		return 0, bad(erange)
	}
	if err != nil {
		return 0, bad(einval)
	}
	if v > math.MaxInt64 {
		return 0, bad(erange)
	}
	return int64(v), nil
}

// suffixMul maps a size suffix to its multiplier (binary units, as QEMU).
func suffixMul(c byte) (uint64, bool) {
	switch c {
	case 'B', 'b':
		return 1, true
	case 'K', 'k':
		return 1 << 10, true
	case 'M', 'm':
		return 1 << 20, true
	case 'G', 'g':
		return 1 << 30, true
	case 'T', 't':
		return 1 << 40, true
	case 'P', 'p':
		return 1 << 50, true
	case 'E', 'e':
		return 1 << 60, true
	}
	return 0, false
}

// parseVsock parses CID:PORT, both decimal, as QEMU's vsock_parse does.
func parseVsock(s string) (Addr, error) {
	cidStr, portStr, ok := strings.Cut(s, ":")
	if !ok || cidStr == "" {
		return Addr{}, fmt.Errorf("error parsing address '%s': write vsock:CID:PORT", s)
	}
	cid, err := parsePort(cidStr, math.MaxUint32)
	if err != nil {
		return Addr{}, fmt.Errorf("error parsing address '%s': bad CID: %v", s, err)
	}
	port, err := parsePort(portStr, math.MaxUint32)
	if err != nil {
		return Addr{}, fmt.Errorf("error parsing address '%s': %v", s, err)
	}
	return Addr{Scheme: SchemeVsock, CID: uint32(cid), Port: port}, nil
}

// validate checks an Addr that may have been built by hand, so Dial and
// Listen fail with a clear message instead of a confusing syscall error.
func (a Addr) validate() error {
	switch a.Scheme {
	case SchemeTCP, SchemeRDMA:
		if a.Port < 0 || a.Port > math.MaxUint16 {
			return fmt.Errorf("%s: port %d is out of range 0..65535", a.Scheme, a.Port)
		}
		if _, err := parseIPv6(a.Host); err == nil {
			return nil
		}
		return checkHost(a.Host)
	case SchemeUnix:
		return checkUnixPath(a.Path)
	case SchemeFD:
		if a.FDName == "" && a.FD < 0 {
			return fmt.Errorf("fd: descriptor %d is negative", a.FD)
		}
		return nil
	case SchemeFile:
		if a.Path == "" {
			return errors.New("file: migration address has no path; write file:PATH[,offset=N]")
		}
		if strings.IndexByte(a.Path, 0) >= 0 {
			return errors.New("file: path contains a NUL byte")
		}
		if a.Offset < 0 {
			return fmt.Errorf("file: offset %d is negative", a.Offset)
		}
		return nil
	case SchemeExec:
		if len(a.Args) == 0 || a.Args[0] == "" {
			return errors.New("exec: address has no command")
		}
		return nil
	case SchemeVsock:
		if a.Port < 0 || a.Port > math.MaxUint32 {
			return fmt.Errorf("vsock: port %d is out of range", a.Port)
		}
		return nil
	}
	return fmt.Errorf("unknown migration protocol: %s", a.Scheme)
}

// parseIPv6 parses an IPv6 literal (with an optional zone), without brackets.
func parseIPv6(s string) (netip.Addr, error) {
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	if !ip.Is6() {
		return netip.Addr{}, fmt.Errorf("%q is not an IPv6 address", s)
	}
	return ip, nil
}
