package mappedram

import (
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// reopen opens a second, independent open file description of f (so
// O_DIRECT can be set on it without touching f's), through /proc/self/fd.
// It works for a path given as file: and for a descriptor given as fd:.
func reopen(f *os.File, flags int) (*os.File, error) {
	path := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("mapped-ram: opening %s (%s) with O_DIRECT: %w (the file system may not support direct I/O: turn direct-io off)", f.Name(), path, err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// dioAlignment returns the memory alignment O_DIRECT needs for f: the
// kernel's STATX_DIOALIGN answer when it gives one, else the page size.
// (On this project's ext4 hosts it reports 512, the device's logical block
// size; page-aligned guest memory always satisfies it.)
func dioAlignment(f *os.File) int {
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st); err == nil &&
		st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_mem_align > 0 {
		return int(max(st.Dio_mem_align, st.Dio_offset_align))
	}
	return os.Getpagesize()
}

func aligned(b []byte, align int) bool {
	return len(b) == 0 || uintptr(unsafe.Pointer(&b[0]))%uintptr(align) == 0
}

// alignedBuf returns n bytes whose first byte is aligned to align.
func alignedBuf(n, align int) []byte {
	b := make([]byte, n+align)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) % uintptr(align)); r != 0 {
		off = align - r
	}
	return b[off : off+n : off+n]
}
