package uffd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors callers branch on; returned errors wrap them (or a unix.Errno) with
// the details.
var (
	// ErrClosed: the FD was closed (before or during the call).
	ErrClosed = errors.New("uffd: descriptor closed")
	// ErrFeature: the kernel does not offer a requested feature.
	ErrFeature = errors.New("uffd: feature not supported by this kernel")
	// ErrGone: the process that created the userfaultfd has exited (ESRCH):
	// there is no address space left to install pages into.
	ErrGone = errors.New("uffd: the registering process has exited")
	// ErrRetry: UFFDIO_COPY or UFFDIO_ZEROPAGE kept answering EAGAIN (the
	// target address space was changing) and the bounded retries ran out.
	ErrRetry = errors.New("uffd: the target address space kept changing (EAGAIN)")
)

// UserMode chooses whether [Open] passes UFFD_USER_MODE_ONLY.
type UserMode int

const (
	// UserModeAuto passes UFFD_USER_MODE_ONLY when the process is not root:
	// with vm.unprivileged_userfaultfd=0 (the default) that is the only way
	// an unprivileged process gets a userfaultfd. Faults taken by the kernel
	// on the process's behalf (read(2) into a registered page) then fail
	// with EFAULT instead of being reported.
	UserModeAuto UserMode = iota
	// UserModeOnly always passes UFFD_USER_MODE_ONLY.
	UserModeOnly
	// UserModeAll never passes it: kernel-mode faults are reported too.
	UserModeAll
)

// Options configure [Open].
type Options struct {
	// Features to enable with UFFDIO_API; Open fails with [ErrFeature] if the
	// kernel lacks one.
	Features Feature
	// UserMode: see [UserModeAuto].
	UserMode UserMode
}

// FD is a userfaultfd. Its methods are safe for concurrent use; [FD.Read]
// admits one reader at a time. Close wakes a reader blocked in Read and
// waits for every call in progress to return before it closes the
// descriptor, so no call ever acts on a reused descriptor number.
type FD struct {
	fd        int     // the userfaultfd, O_NONBLOCK|O_CLOEXEC
	ev        int     // eventfd: Close and a cancelled Read context write to it
	enabled   Feature // what UFFDIO_API enabled (as told, for FromFD)
	supported Feature // what the kernel reported (0 for FromFD)
	ioctls    Ioctls  // from UFFDIO_API (0 for FromFD)
	userOnly  bool

	ops    sync.RWMutex // calls hold it for reading; Close takes it for writing
	closed atomic.Bool

	readMu sync.Mutex // one Read at a time; guards buf
	buf    []byte
}

// Open creates a userfaultfd (O_CLOEXEC|O_NONBLOCK) in this process and
// enables opts.Features with UFFDIO_API. Memory registered through it is
// memory of this process.
func Open(opts Options) (*FD, error) {
	userOnly := opts.UserMode == UserModeOnly || (opts.UserMode == UserModeAuto && os.Geteuid() != 0)
	fd, err := sysOpen(userOnly)
	if err != nil {
		return nil, err
	}
	api := apiArg{API: apiVersion, Features: uint64(opts.Features)}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&api)); err != nil {
		unix.Close(fd)
		if err == unix.EINVAL {
			if sup, qerr := Supported(); qerr == nil && !sup.Has(opts.Features) {
				return nil, fmt.Errorf("uffd: UFFDIO_API: features %v missing (the kernel offers %v): %w", opts.Features&^sup, sup, ErrFeature)
			}
		}
		return nil, fmt.Errorf("uffd: UFFDIO_API with features %v: %w", opts.Features, err)
	}
	f, err := newFD(fd, opts.Features, userOnly)
	if err != nil {
		return nil, err
	}
	f.supported, f.ioctls = Feature(api.Features), Ioctls(api.Ioctls)
	return f, nil
}

// FromFD wraps a userfaultfd created and initialised (UFFDIO_API) by
// another process, received over a unix socket. enabled must be the features
// that process enabled (it travels with the descriptor). FromFD takes
// ownership of fd, sets O_NONBLOCK on it (a flag of the open file, which the
// sender's copy shares) and closes it in Close.
func FromFD(fd int, enabled Feature) (*FD, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: O_NONBLOCK on received descriptor %d: %w", fd, err)
	}
	return newFD(fd, enabled, false)
}

func newFD(fd int, enabled Feature, userOnly bool) (*FD, error) {
	ev, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: eventfd: %w", err)
	}
	return &FD{fd: fd, ev: ev, enabled: enabled, userOnly: userOnly}, nil
}

func sysOpen(userOnly bool) (int, error) {
	flags := uintptr(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if userOnly {
		flags |= flagUserModeOnly
	}
	r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, flags, 0, 0)
	if e != 0 {
		return -1, &OpenError{UserModeOnly: userOnly, Errno: e}
	}
	return int(r), nil
}

// Supported opens a throw-away userfaultfd and returns the features the
// kernel offers (UFFDIO_API may enable features only once per descriptor,
// so asking costs a descriptor).
func Supported() (Feature, error) {
	fd, err := sysOpen(os.Geteuid() != 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	api := apiArg{API: apiVersion}
	if err := ioctl(fd, ioctlAPI, unsafe.Pointer(&api)); err != nil {
		return 0, fmt.Errorf("uffd: UFFDIO_API (query): %w", err)
	}
	return Feature(api.Features), nil
}

// Fd returns the descriptor number, e.g. to send it with SCM_RIGHTS. It
// stays owned by the FD.
func (f *FD) Fd() int { return f.fd }

// Features returns the features enabled on the descriptor.
func (f *FD) Features() Feature { return f.enabled }

// SupportedFeatures returns what the kernel reported at [Open] (0 for a
// descriptor from [FromFD]).
func (f *FD) SupportedFeatures() Feature { return f.supported }

// Ioctls returns the ioctls UFFDIO_API reported (0 for [FromFD]).
func (f *FD) Ioctls() Ioctls { return f.ioctls }

// UserModeOnly reports whether [Open] passed UFFD_USER_MODE_ONLY.
func (f *FD) UserModeOnly() bool { return f.userOnly }

// acquire admits a call unless the FD is closed; release ends it.
func (f *FD) acquire() error {
	f.ops.RLock()
	if f.closed.Load() {
		f.ops.RUnlock()
		return ErrClosed
	}
	return nil
}

func (f *FD) release() { f.ops.RUnlock() }

// Close wakes a Read in progress (it returns [ErrClosed]), waits for every
// call in progress and closes the descriptor. It closes this process's copy
// only: the registering process keeps its own. Close is idempotent.
func (f *FD) Close() error {
	if f.closed.Swap(true) {
		return nil
	}
	f.kick()
	f.ops.Lock()
	defer f.ops.Unlock()
	err1 := unix.Close(f.fd)
	err2 := unix.Close(f.ev)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("uffd: close: %w", err)
	}
	return nil
}

// kick makes a poll in Read return.
func (f *FD) kick() {
	var one [8]byte
	one[0] = 1 // native little-endian uint64 1
	_, _ = unix.Write(f.ev, one[:])
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}

// Register registers r (page-aligned) for the faults of mode and returns the
// ioctls the kernel allows on it (for MISSING over shmem: wake, copy,
// zeropage and more).
func (f *FD) Register(r Range, mode Mode) (Ioctls, error) {
	if err := f.acquire(); err != nil {
		return 0, err
	}
	defer f.release()
	arg := registerArg{Range: rangeArg{r.Start, r.Len}, Mode: uint64(mode)}
	if err := ioctl(f.fd, ioctlRegister, unsafe.Pointer(&arg)); err != nil {
		return 0, fmt.Errorf("uffd: UFFDIO_REGISTER %v mode %#x: %w", r, uint64(mode), mapErr(err))
	}
	return Ioctls(arg.Ioctls), nil
}

// Unregister removes r from the registration. Threads blocked on faults in
// r are woken and retry without userfaultfd (a missing page then reads as
// zeros): unregister only ranges nothing waits on.
func (f *FD) Unregister(r Range) error {
	if err := f.acquire(); err != nil {
		return err
	}
	defer f.release()
	arg := rangeArg{r.Start, r.Len}
	if err := ioctl(f.fd, ioctlUnregister, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("uffd: UFFDIO_UNREGISTER %v: %w", r, mapErr(err))
	}
	return nil
}

// Wake wakes the threads blocked on faults in r. A woken thread retries its
// access: it proceeds if the page is present, and faults again (a new
// message) if it is not.
func (f *FD) Wake(r Range) error {
	if err := f.acquire(); err != nil {
		return err
	}
	defer f.release()
	arg := rangeArg{r.Start, r.Len}
	if err := ioctl(f.fd, ioctlWake, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("uffd: UFFDIO_WAKE %v: %w", r, mapErr(err))
	}
	return nil
}

// Copy is one UFFDIO_COPY: it atomically fills len(src) bytes at dst
// (page-aligned, in the registering process) from src (in this process) and,
// unless mode has [CopyDontWake], wakes the threads waiting on them. It
// returns the bytes copied: on success len(src); when the kernel stopped
// early, the bytes before the stop and an error — EEXIST (wrapped) when the
// first page was already present, EAGAIN when a later page was present or
// the address space was changing. [FD.CopyPages] handles all of these.
func (f *FD) Copy(dst uint64, src []byte, mode CopyMode) (int, error) {
	if len(src) == 0 {
		return 0, nil
	}
	if err := f.acquire(); err != nil {
		return 0, err
	}
	defer f.release()
	arg := copyArg{Dst: dst, Src: uint64(uintptr(unsafe.Pointer(&src[0]))), Len: uint64(len(src)), Mode: uint64(mode)}
	err := ioctl(f.fd, ioctlCopy, unsafe.Pointer(&arg))
	runtime.KeepAlive(src)
	return copied(arg.Copy, err)
}

// ZeroPage is one UFFDIO_ZEROPAGE over r: like [FD.Copy] from a zero
// buffer, without the buffer.
func (f *FD) ZeroPage(r Range, mode CopyMode) (int, error) {
	if r.Len == 0 {
		return 0, nil
	}
	if err := f.acquire(); err != nil {
		return 0, err
	}
	defer f.release()
	arg := zeropageArg{Range: rangeArg{r.Start, r.Len}, Mode: uint64(mode)}
	err := ioctl(f.fd, ioctlZeropage, unsafe.Pointer(&arg))
	return copied(arg.Zeropage, err)
}

// copied turns the kernel's (count or -errno, ioctl error) into (bytes, error).
func copied(n int64, err error) (int, error) {
	if err == nil {
		return int(n), nil
	}
	if n < 0 {
		return 0, mapErr(unix.Errno(-n))
	}
	return int(n), mapErr(err)
}

func mapErr(err error) error {
	if err == unix.ESRCH {
		return fmt.Errorf("%w (%w)", ErrGone, err)
	}
	return err
}

// CopyResult says what [FD.CopyPages] or [FD.ZeroPages] did.
type CopyResult struct {
	Installed int   // pages this call installed
	Existing  []int // indexes (0-based, within the call) of pages that were already present
}

// maxRetries bounds the EAGAIN retries of CopyPages for one page: EAGAIN
// without progress means the registering process is changing its mappings
// (mremap, fork with event features), which ends quickly or not at all.
const maxRetries = 1000

// CopyPages installs len(src)/pageSize pages at dst with as few UFFDIO_COPY
// calls as the kernel allows. A page that is already present (EEXIST) is
// skipped and reported in Existing, and the copy resumes after it; a
// partial copy resumes where it stopped; EAGAIN without progress is retried
// up to a bound ([ErrRetry]). Pages already present are not woken by this
// call: with mode [CopyDontWake] nothing is, otherwise every page it
// installed is. Call [FD.Wake] for Existing pages if a thread may wait on
// them.
func (f *FD) CopyPages(dst uint64, src []byte, pageSize int, mode CopyMode) (CopyResult, error) {
	return f.pages(dst, len(src), pageSize, func(at uint64, off, n int) (int, error) {
		return f.Copy(at, src[off:off+n], mode)
	})
}

// ZeroPages is CopyPages with zero pages (UFFDIO_ZEROPAGE) over r.
func (f *FD) ZeroPages(r Range, pageSize int, mode CopyMode) (CopyResult, error) {
	return f.pages(r.Start, int(r.Len), pageSize, func(at uint64, _, n int) (int, error) {
		return f.ZeroPage(Range{at, uint64(n)}, mode)
	})
}

func (f *FD) pages(dst uint64, length, pageSize int, op func(at uint64, off, n int) (int, error)) (CopyResult, error) {
	var res CopyResult
	if pageSize <= 0 || length%pageSize != 0 || dst%uint64(pageSize) != 0 {
		return res, fmt.Errorf("uffd: copy of %d bytes to %#x: length and address must be multiples of the page size %d: %w", length, dst, pageSize, unix.EINVAL)
	}
	off, retries := 0, 0
	for off < length {
		n, err := op(dst+uint64(off), off, length-off)
		if n > 0 {
			res.Installed += n / pageSize
			off += n - n%pageSize
			retries = 0
		}
		switch {
		case err == nil:
			if n <= 0 {
				return res, fmt.Errorf("uffd: copy to %#x returned %d bytes and no error", dst+uint64(off), n)
			}
		case errors.Is(err, unix.EEXIST):
			res.Existing = append(res.Existing, off/pageSize)
			off += pageSize
		case errors.Is(err, unix.EAGAIN):
			if n > 0 {
				continue // stopped early: the next page is present (EEXIST next time) or it raced
			}
			if retries++; retries > maxRetries {
				return res, fmt.Errorf("uffd: copy to %#x: %w", dst+uint64(off), ErrRetry)
			}
		default:
			return res, fmt.Errorf("uffd: copy to %#x (%d bytes): %w", dst+uint64(off), length-off, err)
		}
	}
	return res, nil
}

// Read waits for fault messages and decodes up to len(msgs) of them. It
// returns when at least one message is read, when ctx is done (ctx.Err(),
// deadline included), or when the FD is closed ([ErrClosed]). The wait is a
// poll(2) on the userfaultfd and an eventfd that Close and ctx's
// cancellation write to, so cancel always reaches it. One Read runs at a
// time.
func (f *FD) Read(ctx context.Context, msgs []Msg) (int, error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	f.readMu.Lock()
	defer f.readMu.Unlock()
	if err := f.acquire(); err != nil {
		return 0, err
	}
	defer f.release()
	if need := len(msgs) * MsgSize; cap(f.buf) < need {
		f.buf = make([]byte, need)
	}
	buf := f.buf[:len(msgs)*MsgSize]
	for {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n, err := unix.Read(f.fd, buf)
		switch {
		case err == nil && n > 0:
			if n%MsgSize != 0 {
				return 0, fmt.Errorf("uffd: read %d bytes, not a multiple of %d: %w", n, MsgSize, ErrMessage)
			}
			k := n / MsgSize
			for i := range k {
				m, err := ParseMsg(buf[i*MsgSize : (i+1)*MsgSize])
				if err != nil {
					return i, err
				}
				msgs[i] = m
			}
			return k, nil
		case err == nil:
			return 0, fmt.Errorf("uffd: read returned end of file")
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return 0, fmt.Errorf("uffd: read: %w", err)
		}
		if err := f.wait(ctx); err != nil {
			return 0, err
		}
	}
}

// maxPoll caps one poll(2) so that a deadline far away, or time spent with
// the machine suspended, is looked at again now and then.
const maxPoll = time.Minute

// wait polls until the userfaultfd is readable, the eventfd is written, or
// ctx's deadline passes.
func (f *FD) wait(ctx context.Context) error {
	timeout := maxPoll
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
		if timeout <= 0 {
			return context.DeadlineExceeded
		}
	}
	stop := context.AfterFunc(ctx, f.kick)
	defer stop()
	fds := []unix.PollFd{{Fd: int32(f.fd), Events: unix.POLLIN}, {Fd: int32(f.ev), Events: unix.POLLIN}}
	ms := int((timeout + time.Millisecond - 1) / time.Millisecond)
	_, err := unix.Poll(fds, ms)
	if err != nil && err != unix.EINTR {
		return fmt.Errorf("uffd: poll: %w", err)
	}
	if fds[1].Revents&unix.POLLIN != 0 {
		var b [8]byte
		_, _ = unix.Read(f.ev, b[:]) // drain; a kick for an older context is harmless
	}
	if f.closed.Load() {
		return ErrClosed
	}
	if fds[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
		return fmt.Errorf("uffd: poll reports error events %#x on the descriptor (UFFDIO_API never done?)", fds[0].Revents)
	}
	return ctx.Err() // nil: read again (also after a timeout before the deadline)
}
