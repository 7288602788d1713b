package uffd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrUnavailable marks every error of [Probe]: userfaultfd cannot serve
// postcopy of memfd-backed RAM for this process.
var ErrUnavailable = errors.New("userfaultfd unavailable")

// OpenError is a failed userfaultfd(2), with the kernel's errno and what it
// means on Linux.
type OpenError struct {
	UserModeOnly bool // the call passed UFFD_USER_MODE_ONLY
	Errno        unix.Errno
}

// Error says which call failed, the errno, and what it means here.
func (e *OpenError) Error() string {
	how := "userfaultfd(O_CLOEXEC|O_NONBLOCK)"
	if e.UserModeOnly {
		how = "userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)"
	}
	return fmt.Sprintf("uffd: %s: %v: %s", how, e.Errno, e.reason())
}

// Unwrap returns the errno.
func (e *OpenError) Unwrap() error { return e.Errno }

func (e *OpenError) reason() string {
	switch e.Errno {
	case unix.ENOSYS:
		return "the kernel has no userfaultfd (CONFIG_USERFAULTFD is off) or a seccomp filter refuses the system call"
	case unix.EPERM:
		return fmt.Sprintf("vm.unprivileged_userfaultfd is %s and this process lacks CAP_SYS_PTRACE: run as root, or set the sysctl to 1", sysctl("/proc/sys/vm/unprivileged_userfaultfd"))
	case unix.EINVAL:
		if e.UserModeOnly {
			return "the kernel predates UFFD_USER_MODE_ONLY (Linux 5.11): run as root or set vm.unprivileged_userfaultfd=1"
		}
		return "the kernel refused the flags"
	case unix.EMFILE, unix.ENFILE:
		return "out of file descriptors"
	}
	return "unexpected error"
}

func sysctl(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unreadable (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b))
}

// Probe checks that this process can do what migctl's postcopy needs, end
// to end: open a userfaultfd (with UFFD_USER_MODE_ONLY when not root),
// enable [FeatureMissingShmem] and register a memfd mapping for MISSING
// faults with UFFDIO_COPY allowed. It returns nil, or an error wrapping
// [ErrUnavailable] whose text is the kernel's reason — the host fact
// "userfaultfd" that rules refusing postcopy quote.
func Probe() error {
	fail := func(step string, err error) error {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, step, err)
	}
	f, err := Open(Options{Features: FeatureMissingShmem})
	if err != nil {
		return fail("open", err)
	}
	defer f.Close()
	mfd, err := unix.MemfdCreate("migctl-uffd-probe", unix.MFD_CLOEXEC)
	if err != nil {
		return fail("memfd_create", err)
	}
	defer unix.Close(mfd)
	pg := os.Getpagesize()
	if err := unix.Ftruncate(mfd, int64(pg)); err != nil {
		return fail("ftruncate", err)
	}
	mem, err := unix.Mmap(mfd, 0, pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap", err)
	}
	defer unix.Munmap(mem)
	r := Range{Start: uint64(uintptr(unsafe.Pointer(&mem[0]))), Len: uint64(pg)}
	ioctls, err := f.Register(r, ModeMissing)
	if err != nil {
		return fail("register a memfd mapping (MISSING)", err)
	}
	if !ioctls.Has(IoctlCopy | IoctlWake) {
		return fail("register", fmt.Errorf("the kernel allows ioctls %#x on shared memory, without UFFDIO_COPY and UFFDIO_WAKE", uint64(ioctls)))
	}
	if err := f.Unregister(r); err != nil {
		return fail("unregister", err)
	}
	return nil
}
