package qmp

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/transport"
)

// Descriptors, as QEMU's monitor passes them: a client of the unix
// control socket sends a descriptor with SCM_RIGHTS together with
// {"execute":"getfd","arguments":{"fdname":NAME}}; migrate and
// migrate-incoming then take it as fd:NAME (once: the migration owns it),
// and closefd forgets one unused. Numbers in fd:N name only descriptors the
// process inherited at startup and its owner declared (serve --fd N), never
// any other descriptor of the process.

var _ = addCommands(map[string]command{
	"getfd":   {run: cmdGetFD},
	"closefd": {run: cmdCloseFD},
})

// MaxFDs bounds the descriptors a server holds by name.
const MaxFDs = 128

// maxFDsPerMessage bounds the descriptors read with one message; the
// kernel discards the rest of a message that carries more.
const maxFDsPerMessage = 16

// FDTable is a server's table of descriptors: named ones registered with
// getfd (one table per server, shared by its clients, as a QEMU monitor's
// table is shared by the connections it serves in turn), and numbered
// ones inherited at startup (Inherit). It implements
// transport.Descriptors, so a transport.Config with it resolves fd:
// addresses from the table alone. It is safe for concurrent use.
type FDTable struct {
	mu       sync.Mutex
	named    map[string]*os.File
	numbered map[int]*os.File
	closed   bool
}

// NewFDTable returns an empty table.
func NewFDTable() *FDTable {
	return &FDTable{named: map[string]*os.File{}, numbered: map[int]*os.File{}}
}

var _ transport.Descriptors = (*FDTable)(nil)

// Inherit adds descriptor n, which the process inherited from its parent
// (serve --fd N: QEMU's -incoming fd:N), as fd:N. It refuses 0, 1 and 2
// (serve's standard streams), a descriptor that is not open, and one that
// is close-on-exec: an inherited descriptor never is (it crossed an exec),
// while every descriptor migctl opens is (Go opens them all with
// O_CLOEXEC), so guest memory, listeners and control connections can
// never be declared. The table marks it close-on-exec from then on, so
// exec: migrations do not leak it.
func (t *FDTable) Inherit(n int) error {
	if n <= 2 {
		return fmt.Errorf("--fd %d: descriptors 0, 1 and 2 are serve's standard input, output and error; open the migration on another number (e.g. 3<file)", n)
	}
	fl, err := unix.FcntlInt(uintptr(n), unix.F_GETFD, 0)
	if err != nil {
		return fmt.Errorf("--fd %d: descriptor %d is not open in this process (%v): open it in the shell that starts serve, e.g. %d<file", n, n, err, n)
	}
	if fl&unix.FD_CLOEXEC != 0 {
		return fmt.Errorf("--fd %d: descriptor %d is close-on-exec, so it was not inherited from serve's parent: it is one of migctl's own", n, n)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errors.New("the descriptor table is closed")
	}
	if _, dup := t.numbered[n]; dup {
		return fmt.Errorf("--fd %d given twice", n)
	}
	if _, err := unix.FcntlInt(uintptr(n), unix.F_SETFD, fl|unix.FD_CLOEXEC); err != nil {
		return fmt.Errorf("--fd %d: %w", n, err)
	}
	t.numbered[n] = os.NewFile(uintptr(n), "fd:"+strconv.Itoa(n))
	return nil
}

// TakeFD implements transport.Descriptors: it removes the descriptor a
// names from the table and hands it over, as QEMU's monitor_get_fd does.
func (t *FDTable) TakeFD(a transport.Addr) (*os.File, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f, err := t.lookupLocked(a)
	if err != nil {
		return nil, err
	}
	if a.FDName != "" {
		delete(t.named, a.FDName)
	} else {
		delete(t.numbered, a.FD)
	}
	return f, nil
}

// PeekFD implements transport.DescriptorPeeker: it returns the descriptor
// a names without removing it from the table, so transport.Probe can tell
// a regular file from a socket (the properties the rules judge) before the
// migration takes it.
func (t *FDTable) PeekFD(a transport.Addr) (*os.File, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lookupLocked(a)
}

// check reports whether TakeFD would find a descriptor for a now.
func (t *FDTable) check(a transport.Addr) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, err := t.lookupLocked(a)
	return err
}

func (t *FDTable) lookupLocked(a transport.Addr) (*os.File, error) {
	if a.FDName != "" {
		if f, ok := t.named[a.FDName]; ok {
			return f, nil
		}
		return nil, fmt.Errorf("File descriptor named '%s' has not been found: register it first with getfd over the unix control socket (an fd: name is used once)", a.FDName)
	}
	if f, ok := t.numbered[a.FD]; ok {
		return f, nil
	}
	return nil, fmt.Errorf("descriptor %d was not passed to migctl serve with --fd %d: fd:N takes only descriptors declared at startup; pass others with getfd and use fd:NAME", a.FD, a.FD)
}

// add registers f under name, replacing (and closing) a descriptor of the
// same name, as QEMU's getfd does.
func (t *FDTable) add(name string, f *os.File) error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		f.Close()
		return errors.New("migctl is shutting down")
	}
	old, replace := t.named[name]
	if !replace && len(t.named) >= MaxFDs {
		t.mu.Unlock()
		f.Close()
		return fmt.Errorf("too many descriptors registered (%d): closefd some first", MaxFDs)
	}
	t.named[name] = f
	t.mu.Unlock()
	if replace {
		old.Close()
	}
	return nil
}

// remove closes and forgets the descriptor named name (closefd).
func (t *FDTable) remove(name string) error {
	t.mu.Lock()
	f, ok := t.named[name]
	delete(t.named, name)
	t.mu.Unlock()
	if !ok {
		return fmt.Errorf("File descriptor named '%s' not found", name)
	}
	return f.Close()
}

// Names returns the names registered with getfd and the numbers declared
// with Inherit, for diagnostics.
func (t *FDTable) Names() (names []string, numbers []int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for n := range t.named {
		names = append(names, n)
	}
	for n := range t.numbered {
		numbers = append(numbers, n)
	}
	return names, numbers
}

// Close closes every descriptor still in the table; later getfd calls
// fail. It is idempotent.
func (t *FDTable) Close() error {
	t.mu.Lock()
	files := make([]*os.File, 0, len(t.named)+len(t.numbered))
	for _, f := range t.named {
		files = append(files, f)
	}
	for _, f := range t.numbered {
		files = append(files, f)
	}
	clear(t.named)
	clear(t.numbered)
	t.closed = true
	t.mu.Unlock()
	var errs []error
	for _, f := range files {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// FDs returns the server's descriptor table (Options.FDs, or the one the
// server made).
func (s *Server) FDs() *FDTable { return s.fds }

// validFDName checks a getfd name beyond QEMU's rule (not starting with a
// digit, which getfd checks first): it must be usable in an fd:NAME
// address.
func validFDName(name string) error {
	switch {
	case name == "":
		return errors.New("Parameter 'fdname' expects a non-empty name")
	case len(name) > 255:
		return fmt.Errorf("Parameter 'fdname' expects a name of at most 255 bytes, not %d", len(name))
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c == 0x7f || c == ',' {
			return errors.New("Parameter 'fdname' expects a name without spaces, commas or control characters (it is used as fd:NAME)")
		}
	}
	return nil
}

func cmdGetFD(s *Server, cl *client, a *args) (any, func(), error) {
	name, _ := a.str("fdname", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	f := cl.takePendingFD()
	if f == nil {
		if _, unixConn := cl.rw.(*net.UnixConn); !unixConn {
			return nil, nil, genericf("No file descriptor supplied via SCM_RIGHTS: descriptors can be passed only over the unix control socket")
		}
		return nil, nil, genericf("No file descriptor supplied via SCM_RIGHTS: send the descriptor (SCM_RIGHTS) with the bytes of this getfd request")
	}
	if name != "" && name[0] >= '0' && name[0] <= '9' {
		f.Close()
		return nil, nil, genericf("Parameter 'fdname' expects a name not starting with a digit")
	}
	if err := validFDName(name); err != nil {
		f.Close()
		return nil, nil, genericf("%s", err.Error())
	}
	if err := s.fds.add(name, f); err != nil {
		return nil, nil, genericf("%s", err.Error())
	}
	return struct{}{}, nil, nil
}

func cmdCloseFD(s *Server, cl *client, a *args) (any, func(), error) {
	name, _ := a.str("fdname", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if cl.priv < Owner {
		return nil, nil, genericf("closefd is refused on this connection: descriptors are registered over the unix control socket and only its clients may close them; %s", localUserWhy)
	}
	if err := s.fds.remove(name); err != nil {
		return nil, nil, genericf("%s", err.Error())
	}
	return struct{}{}, nil, nil
}

// fdReader reads a unix control connection with recvmsg, keeping the
// descriptors that arrive (SCM_RIGHTS) for getfd: as in QEMU's socket
// character device, the descriptors of the latest message that carried
// any replace those not yet taken.
type fdReader struct {
	c   *net.UnixConn
	cl  *client
	oob []byte
}

// reader0 returns what the client's requests are read from: the
// connection, read with recvmsg on a unix socket so that descriptors can
// arrive.
func (cl *client) reader0() io.Reader {
	if uc, ok := cl.rw.(*net.UnixConn); ok {
		return &fdReader{c: uc, cl: cl, oob: make([]byte, unix.CmsgSpace(maxFDsPerMessage*4))}
	}
	return cl.rw
}

func (r *fdReader) Read(b []byte) (int, error) {
	n, oobn, _, _, err := r.c.ReadMsgUnix(b, r.oob)
	if oobn > 0 {
		r.cl.received(r.oob[:oobn])
	}
	return max(n, 0), err // recvmsg's -1 on error is not a count
}

// received keeps the descriptors in control messages oob (owned by the
// reader goroutine). Go's ReadMsgUnix receives them close-on-exec.
func (cl *client) received(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "getfd"))
		}
	}
	if len(files) == 0 {
		return
	}
	cl.closePendingFDs()
	cl.pendingFDs = files
}

// takePendingFD returns the first descriptor of the latest message that
// carried any, and closes the others (QEMU's getfd takes one); nil if
// none is waiting.
func (cl *client) takePendingFD() *os.File {
	if len(cl.pendingFDs) == 0 {
		return nil
	}
	f := cl.pendingFDs[0]
	for _, g := range cl.pendingFDs[1:] {
		g.Close()
	}
	cl.pendingFDs = nil
	return f
}

func (cl *client) closePendingFDs() {
	for _, f := range cl.pendingFDs {
		f.Close()
	}
	cl.pendingFDs = nil
}
