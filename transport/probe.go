package transport

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Props are the properties of one migration endpoint, in the words of the
// spec's transports (transitions.yaml): what the rules of the capabilities
// test. Most schemes have fixed properties, which the spec declares; an
// fd: address has those of whatever its descriptor is, which only fstat
// can tell (see Probe).
type Props struct {
	MultiChannel bool // carries several connections (multifd, postcopy-preempt)
	Seekable     bool // pages can be written at fixed offsets (mapped-ram)
	ReturnPath   bool // the destination can answer the source
	ExtraFDs     bool // can take extra descriptors of the same file (direct-io)
	Streamable   bool // a stream two processes share live (cpr-transfer)
}

// Map returns the properties keyed by the spec's property names
// (multi-channel, seekable, return-path, extra-fds, streamable), every name
// present, as guards.Endpoint.Props wants them.
func (p Props) Map() map[string]bool {
	return map[string]bool{
		"multi-channel": p.MultiChannel,
		"seekable":      p.Seekable,
		"return-path":   p.ReturnPath,
		"extra-fds":     p.ExtraFDs,
		"streamable":    p.Streamable,
	}
}

// Probe resolves the properties of a with the zero Config. See
// Config.Probe.
func Probe(a Addr) (Props, bool, error) {
	var c Config
	return c.Probe(a)
}

// DescriptorPeeker is implemented by a Descriptors table that lets Probe
// look at a descriptor without taking it. The file returned stays the
// table's: Probe only fstat's it.
type DescriptorPeeker interface {
	PeekFD(a Addr) (*os.File, error)
}

// Probe resolves the properties of the endpoint a names where they depend
// on what the address refers to rather than on its scheme. It answers
// (ok true) for fd: addresses, by fstat and fcntl on the descriptor, which
// it neither takes nor changes:
//
//	regular file          seekable, extra-fds (as file:): pages can be
//	                      written at fixed offsets, and the file reopened
//	                      through /proc/self/fd for O_DIRECT
//	socket                return-path, streamable (the spec's fd:)
//	listening socket      return-path, streamable
//	pipe, FIFO, other     streamable (one way: no return path)
//
// For every other scheme ok is false: the spec's declared properties
// apply. An fd: descriptor that cannot be found or inspected is an error
// (the migration would fail to open it too). With c.Descriptors set, the
// table must implement DescriptorPeeker, or ok is false.
func (c *Config) Probe(a Addr) (Props, bool, error) {
	if a.Scheme != SchemeFD {
		return Props{}, false, nil
	}
	if err := a.validate(); err != nil {
		return Props{}, false, err
	}
	var fi fdInfo
	var err error
	if c.Descriptors != nil {
		pk, ok := c.Descriptors.(DescriptorPeeker)
		if !ok {
			return Props{}, false, nil
		}
		f, perr := pk.PeekFD(a)
		if perr != nil {
			return Props{}, false, perr
		}
		if f == nil {
			return Props{}, false, fmt.Errorf("descriptor %s: the table returned no file", a)
		}
		rc, cerr := f.SyscallConn()
		if cerr != nil {
			return Props{}, false, cerr
		}
		// Control, not Fd: Fd would switch the descriptor to blocking mode.
		if cerr := rc.Control(func(fd uintptr) { fi, err = inspectFD(int(fd)) }); cerr != nil {
			return Props{}, false, cerr
		}
	} else {
		fd, rerr := c.resolveFD(a)
		if rerr != nil {
			return Props{}, false, rerr
		}
		fi, err = inspectFD(fd)
	}
	if err != nil {
		return Props{}, false, fmt.Errorf("probe %s: %w", a, err)
	}
	return fi.props(), true, nil
}

// props maps what a descriptor is to its transport properties.
func (fi fdInfo) props() Props {
	switch fi.kind {
	case fdRegular:
		return Props{Seekable: true, ExtraFDs: true}
	case fdSocket, fdListening:
		return Props{ReturnPath: true, Streamable: true}
	}
	return Props{Streamable: true}
}

// RegularFile returns the regular file behind a channel Dial or Listen
// opened on file: or on an fd: naming a regular file, and true; for any
// other channel it returns false. The file stays the Conn's: callers that
// keep using it after the Conn may be closed (by a cancel) duplicate it.
func RegularFile(c Conn) (*os.File, bool) {
	fc, ok := c.(*fileConn)
	if sf, isSave := c.(*saveFile); isSave {
		fc, ok = sf.fileConn, true // the temporary file of an atomic save
	}
	if !ok || !fc.regular {
		return nil, false
	}
	return fc.f, true
}

// DupFile returns a new descriptor (close-on-exec) for the same open file
// description as f: same offset, same flags. The caller closes it.
func DupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("duplicate %s: %w", f.Name(), derr)
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}
