// Package host reports which host features the spec's capabilities may
// need (transitions.yaml, section features) are present on this machine.
package host

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Features probes the host once per call and returns the spec's feature
// names that are present:
//   - userfaultfd: the userfaultfd(2) syscall works for this process
//     (root, or vm.unprivileged_userfaultfd=1);
//   - msg-zerocopy: Linux has MSG_ZEROCOPY (it still copies on loopback).
//
// kvm-dirty-ring, uffd-wp and colo-replication are never reported: migctl
// has no KVM, does no background snapshots yet and has no COLO.
func Features() map[string]bool {
	f := map[string]bool{}
	if runtime.GOOS != "linux" {
		return f
	}
	f["msg-zerocopy"] = true
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno == 0 {
		unix.Close(int(fd))
		f["userfaultfd"] = true
	}
	return f
}

// DataPlaneNice is the nice value LowerThreadPriority gives a data-plane
// thread: the kernel then prefers the control plane's threads when the
// cores are busy copying guest memory.
const DataPlaneNice = 10

// LowerThreadPriority pins the calling goroutine to its OS thread and
// lowers that thread's CPU priority to DataPlaneNice. Call it at the top
// of a data-plane goroutine (the engine's sender, the loader) and never
// unlock: when the goroutine returns, the Go runtime ends the thread, so
// the lowered priority never leaks to other goroutines. Failures (no
// permission to change the priority) are ignored: the goroutine merely
// keeps the normal priority.
func LowerThreadPriority() {
	if runtime.GOOS != "linux" {
		return
	}
	runtime.LockOSThread()
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), DataPlaneNice)
}
