package uffd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary run helperMain instead of the tests.
const helperEnv = "MIGCTL_UFFD_TEST_HELPER"

// helperMain is a faulting process: it creates a 2-page memfd, registers it
// (MISSING) with its own userfaultfd, sends {base, tid, features} + the
// userfaultfd and the memfd over the socket at fd 3, and on "go" reads page
// 0 and writes page 1 from plain Go code (user-mode faults; the handler is
// the parent process). It replies with the byte it read, and exits when
// the parent says so, keeping its copy of the userfaultfd until then.
func helperMain() int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "uffd helper:", err); return 2 }
	const sock = 3
	runtime.LockOSThread()
	tid := unix.Gettid()
	memfd, err := unix.MemfdCreate("uffd-helper", unix.MFD_CLOEXEC)
	if err != nil {
		return fail(err)
	}
	if err := unix.Ftruncate(memfd, 2*pg); err != nil {
		return fail(err)
	}
	mem, err := unix.Mmap(memfd, 0, 2*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail(err)
	}
	f, err := Open(Options{Features: FeatureMissingShmem | FeatureThreadID, UserMode: UserModeAll})
	if err != nil {
		return fail(err)
	}
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if _, err := f.Register(Range{base, 2 * pg}, ModeMissing); err != nil {
		return fail(err)
	}
	hello := binary.LittleEndian.AppendUint64(nil, base)
	hello = binary.LittleEndian.AppendUint32(hello, uint32(tid))
	hello = binary.LittleEndian.AppendUint64(hello, uint64(f.Features()))
	if err := unix.Sendmsg(sock, hello, unix.UnixRights(f.Fd(), memfd), nil, 0); err != nil {
		return fail(err)
	}
	var b [1]byte
	if _, err := unix.Read(sock, b[:]); err != nil {
		return fail(err)
	}
	v := mem[0]      // read fault on page 0
	mem[pg+8] = 0x5a // write fault on page 1
	if _, err := unix.Write(sock, []byte{v}); err != nil {
		return fail(err)
	}
	if _, err := unix.Read(sock, b[:]); err != nil { // the parent is done
		return fail(err)
	}
	f.Close()
	return 0
}

// recvTimeout waits (poll) up to d for a message on fd, then receives it.
func recvTimeout(t *testing.T, fd int, p, oob []byte, d time.Duration) (n, oobn int) {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if k, err := unix.Poll(pfd, int(d/time.Millisecond)); err != nil || k == 0 {
		t.Fatalf("nothing from the helper within %v (%v)", d, err)
	}
	n, oobn, _, _, err := unix.Recvmsg(fd, p, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	return n, oobn
}

// User-mode faults of another process, received with its userfaultfd over a
// unix socket: a read fault has no flag, a write fault has FaultWrite, both
// carry the faulting thread's id, and UFFDIO_COPY from this process fills
// the other process's pages.
func TestCrossProcessUserFaults(t *testing.T) {
	if err := Probe(); err != nil {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[0])
	childEnd := os.NewFile(uintptr(pair[1]), "helper-socket")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.ExtraFiles = []*os.File{childEnd}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	childEnd.Close()
	exited := false
	defer func() {
		if !exited {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()

	buf := make([]byte, 64)
	oob := make([]byte, unix.CmsgSpace(2*4))
	n, oobn := recvTimeout(t, pair[0], buf, oob, 20*time.Second)
	if n != 20 {
		t.Fatalf("hello of %d bytes", n)
	}
	scms, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(scms) != 1 {
		t.Fatalf("control messages: %v, %v", scms, err)
	}
	fds, err := unix.ParseUnixRights(&scms[0])
	if err != nil || len(fds) != 2 {
		t.Fatalf("rights: %v, %v", fds, err)
	}
	defer unix.Close(fds[1])
	base := binary.LittleEndian.Uint64(buf[0:8])
	tid := binary.LittleEndian.Uint32(buf[8:12])
	feat := Feature(binary.LittleEndian.Uint64(buf[12:20]))
	f, err := FromFD(fds[0], feat)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !f.Features().Has(FeatureThreadID) {
		t.Fatalf("features %v", f.Features())
	}

	if _, err := unix.Write(pair[0], []byte{1}); err != nil {
		t.Fatal(err)
	}
	m := readOne(t, f)
	if m.Event != EventPagefault || m.Address != base || m.Flags != 0 || m.TID != tid {
		t.Fatalf("first fault %+v; want a read at %#x by thread %d", m, base, tid)
	}
	if _, err := f.CopyPages(base, pattern(1), pg, 0); err != nil {
		t.Fatal(err)
	}
	m = readOne(t, f)
	if m.Address != base+pg || m.Flags != FaultWrite || m.TID != tid {
		t.Fatalf("second fault %+v; want a write at %#x by thread %d", m, base+pg, tid)
	}
	if _, err := f.CopyPages(base+pg, pattern(2), pg, 0); err != nil {
		t.Fatal(err)
	}
	if n, _ := recvTimeout(t, pair[0], buf, nil, 20*time.Second); n != 1 || buf[0] != pattern(1)[0] {
		t.Fatalf("the helper read %#x, want %#x", buf[0], pattern(1)[0])
	}
	got := make([]byte, pg)
	if _, err := unix.Pread(fds[1], got, pg); err != nil {
		t.Fatal(err)
	}
	want := pattern(2)
	want[8] = 0x5a
	if !bytes.Equal(got, want) {
		t.Fatal("page 1 is not the installed page with the helper's write on top")
	}
	if _, err := unix.Write(pair[0], []byte{2}); err != nil {
		t.Fatal(err)
	}
	exited = true
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

// nobodyMain runs as an unprivileged user: it reports what a plain
// userfaultfd(2) and Probe (which passes UFFD_USER_MODE_ONLY when not root)
// say, one line each.
func nobodyMain() int {
	_, err := Open(Options{UserMode: UserModeAll, Features: FeatureMissingShmem})
	fmt.Printf("all: %v\n", err)
	fmt.Printf("probe: %v\n", Probe())
	return 0
}

// Unprivileged, with vm.unprivileged_userfaultfd=0: a plain userfaultfd(2)
// is refused with EPERM and a reason naming the sysctl, while Probe, which
// asks for UFFD_USER_MODE_ONLY when not root, succeeds (reference
// go-libs.md §4: "nobody, USER_MODE_ONLY: works").
func TestUnprivilegedUserModeOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a helper as nobody")
	}
	if v, _ := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); string(bytes.TrimSpace(v)) != "0" {
		t.Skipf("vm.unprivileged_userfaultfd is %q, not 0: the refusal cannot be observed", bytes.TrimSpace(v))
	}
	dir, err := os.MkdirTemp("", "uffd-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	bin := dir + "/uffd.test"
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=nobody")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as nobody: %v\n%s", err, out)
	}
	want := []string{"all: uffd: userfaultfd(O_CLOEXEC|O_NONBLOCK): operation not permitted: vm.unprivileged_userfaultfd is 0", "probe: <nil>"}
	for _, w := range want {
		if !bytes.Contains(out, []byte(w)) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}
