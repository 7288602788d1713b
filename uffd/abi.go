package uffd

import (
	"fmt"
	"math/bits"
	"strings"
)

// The kernel ABI (include/uapi/linux/userfaultfd.h). x/sys/unix v0.50.0 has
// only SYS_USERFAULTFD; every number below was checked against the header of
// linux-libc-dev 6.1 and against a 6.18 kernel (TestIoctlNumbers recomputes
// them from the _IOC formula and the struct sizes).
const (
	apiVersion = 0xAA // UFFD_API

	ioctlAPI        = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)      24 bytes
	ioctlRegister   = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register) 32 bytes
	ioctlUnregister = 0x8010aa01 // _IOR(0xAA, 0x01, struct uffdio_range)     16 bytes
	ioctlWake       = 0x8010aa02 // _IOR(0xAA, 0x02, struct uffdio_range)     16 bytes
	ioctlCopy       = 0xc028aa03 // _IOWR(0xAA, 0x03, struct uffdio_copy)     40 bytes
	ioctlZeropage   = 0xc020aa04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage) 32 bytes

	flagUserModeOnly = 1 // UFFD_USER_MODE_ONLY, a flag of userfaultfd(2) (Linux 5.11+)
)

// uffdio_api
type apiArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdio_range
type rangeArg struct {
	Start uint64
	Len   uint64
}

// uffdio_register
type registerArg struct {
	Range  rangeArg
	Mode   uint64
	Ioctls uint64
}

// uffdio_copy: Copy is written by the kernel: bytes copied, or -errno.
type copyArg struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

// uffdio_zeropage: Zeropage is written by the kernel like copyArg.Copy.
type zeropageArg struct {
	Range    rangeArg
	Mode     uint64
	Zeropage int64
}

// Feature is a set of UFFD_FEATURE_* bits: what UFFDIO_API enables on a
// descriptor and what the kernel reports it supports.
type Feature uint64

// The features of UFFDIO_API. Postcopy of memfd-backed RAM needs
// [FeatureMissingShmem]; [FeatureThreadID] adds the faulting thread's id to
// each message.
const (
	FeaturePagefaultFlagWP  Feature = 1 << 0
	FeatureEventFork        Feature = 1 << 1
	FeatureEventRemap       Feature = 1 << 2
	FeatureEventRemove      Feature = 1 << 3
	FeatureMissingHugetlbfs Feature = 1 << 4
	FeatureMissingShmem     Feature = 1 << 5
	FeatureEventUnmap       Feature = 1 << 6
	FeatureSigbus           Feature = 1 << 7
	FeatureThreadID         Feature = 1 << 8
	FeatureMinorHugetlbfs   Feature = 1 << 9
	FeatureMinorShmem       Feature = 1 << 10
	FeatureExactAddress     Feature = 1 << 11
	FeatureWPHugetlbfsShmem Feature = 1 << 12
	FeatureWPUnpopulated    Feature = 1 << 13
	FeaturePoison           Feature = 1 << 14
	FeatureWPAsync          Feature = 1 << 15
	FeatureMove             Feature = 1 << 16
	featureHighestKnown             = 16
	featureNamesLen                 = featureHighestKnown + 1
)

var featureNames = [featureNamesLen]string{
	"pagefault-flag-wp", "event-fork", "event-remap", "event-remove",
	"missing-hugetlbfs", "missing-shmem", "event-unmap", "sigbus",
	"thread-id", "minor-hugetlbfs", "minor-shmem", "exact-address",
	"wp-hugetlbfs-shmem", "wp-unpopulated", "poison", "wp-async", "move",
}

// Has reports whether every feature of g is in f.
func (f Feature) Has(g Feature) bool { return f&g == g }

// String lists the features by name ("missing-shmem|thread-id"); unknown
// bits print as "bit N".
func (f Feature) String() string {
	if f == 0 {
		return "none"
	}
	var parts []string
	for v := uint64(f); v != 0; v &= v - 1 {
		b := bits.TrailingZeros64(v)
		if b < featureNamesLen {
			parts = append(parts, featureNames[b])
		} else {
			parts = append(parts, fmt.Sprintf("bit %d", b))
		}
	}
	return strings.Join(parts, "|")
}

// Ioctls is the set of ioctls the kernel allows, as UFFDIO_API and
// UFFDIO_REGISTER report it: bit n is the ioctl with number n.
type Ioctls uint64

// The bits of [Ioctls] (the _UFFDIO_* numbers).
const (
	IoctlRegister     Ioctls = 1 << 0x00
	IoctlUnregister   Ioctls = 1 << 0x01
	IoctlWake         Ioctls = 1 << 0x02
	IoctlCopy         Ioctls = 1 << 0x03
	IoctlZeropage     Ioctls = 1 << 0x04
	IoctlMove         Ioctls = 1 << 0x05
	IoctlWriteProtect Ioctls = 1 << 0x06
	IoctlContinue     Ioctls = 1 << 0x07
	IoctlPoison       Ioctls = 1 << 0x08
	IoctlAPI          Ioctls = 1 << 0x3F
)

// Has reports whether every ioctl of j is in i.
func (i Ioctls) Has(j Ioctls) bool { return i&j == j }

// Mode is how a range is registered: which faults it reports.
type Mode uint64

// Registration modes (UFFDIO_REGISTER_MODE_*). migctl uses [ModeMissing]
// only: MINOR-only registration on shmem silently zero-fills pages that were
// never written, and MINOR makes every precopied page fault once more.
const (
	ModeMissing Mode = 1 << 0
	ModeWP      Mode = 1 << 1
	ModeMinor   Mode = 1 << 2
)

// CopyMode modifies [FD.Copy] and [FD.ZeroPage].
type CopyMode uint64

// CopyDontWake installs the page without waking the threads blocked on it
// (UFFDIO_COPY_MODE_DONTWAKE, same bit as UFFDIO_ZEROPAGE_MODE_DONTWAKE):
// the caller wakes them later with [FD.Wake], e.g. once for a whole batch.
const CopyDontWake CopyMode = 1 << 0

// Range is a span of addresses in the address space of the process that
// created the userfaultfd.
type Range struct {
	Start uint64
	Len   uint64
}

// End returns Start+Len.
func (r Range) End() uint64 { return r.Start + r.Len }

// String formats r as a half-open interval of addresses.
func (r Range) String() string { return fmt.Sprintf("[%#x, %#x)", r.Start, r.End()) }
