package transport

import (
	"fmt"
	"net"
	"os"
)

// Descriptors resolves fd: addresses for Dial and Listen when set as
// Config.Descriptors: the descriptor an address names comes from the
// caller's table (QMP's getfd names, descriptors inherited at startup),
// already open, instead of being taken by number from the process's
// descriptor table. The number in fd:N is then only a key into the
// caller's table: no other descriptor of the process (guest memory, a
// listener, a control connection) can be reached through an fd: address.
type Descriptors interface {
	// TakeFD removes the descriptor a names (a.FDName, or a.FD when
	// FDName is empty) from the table and returns it; the transport owns
	// it from then on and closes it, whether the channel opens or not, as
	// QEMU's monitor_get_fd hands its caller the descriptor. An error
	// refuses the address; its text should say what to change.
	TakeFD(a Addr) (*os.File, error)
}

// openFDAddr opens the channel an fd: address names: through
// c.Descriptors when set, otherwise by name through c.ResolveFD or by
// number (see Dial). write selects the outgoing side.
func (c *Config) openFDAddr(a Addr, write bool) (Conn, net.Listener, error) {
	if c.Descriptors == nil {
		fd, err := c.resolveFD(a)
		if err != nil {
			return nil, nil, err
		}
		return openFD(a, fd, write, a.FDName == "")
	}
	f, err := c.Descriptors.TakeFD(a)
	if err != nil {
		return nil, nil, err
	}
	if f == nil {
		return nil, nil, fmt.Errorf("descriptor %s: the table returned no file", a)
	}
	defer f.Close() // the channel works on its own duplicate
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var (
		conn Conn
		ln   net.Listener
		oerr error
	)
	// Control, not Fd: Fd would switch the descriptor to blocking mode.
	if err := rc.Control(func(fd uintptr) { conn, ln, oerr = openFD(a, int(fd), write, false) }); err != nil {
		return nil, nil, err
	}
	return conn, ln, oerr
}
