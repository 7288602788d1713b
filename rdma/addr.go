package rdma

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// addrOf is the virtual address of b's first byte (b's backing array if b
// is empty but has capacity).
func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }

func munmap(b []byte) error { return unix.Munmap(b) }
