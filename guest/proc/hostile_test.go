package proc

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count descriptors: %v", err)
	}
	return len(ents)
}

func memfdOf(t *testing.T, size int64) int {
	t.Helper()
	fd, err := unix.MemfdCreate("hostile", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	return fd
}

// A hostile or broken guest process: Attach refuses a HELLO whose
// descriptors do not match what it announces, a memfd of another size than
// announced (mapping past its end would turn accesses into SIGBUS), a
// received bitmap with a bad header, or a payload that is not the JSON of
// a Hello — each with ErrProtocol (or the server's error), and without
// keeping any descriptor it was sent.
func TestAttachRejectsHostileHello(t *testing.T) {
	pages := []int{256}
	bmSize, offsets := bitmapLayout(pages)
	goodBitmap := func() int {
		fd := memfdOf(t, bmSize)
		mem, err := unix.Mmap(fd, 0, int(bmSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		writeBitmapHeader(mem, pages, offsets)
		unix.Munmap(mem)
		return fd
	}
	hello := func() Hello {
		h := validHello()
		h.Blocks = []BlockInfo{{Name: "pc.ram", Size: 256 * 4096, PageSize: 4096, Addr: 0x7f0000000000}}
		h.BitmapSize = bmSize
		return h
	}
	for _, c := range []struct {
		name    string
		payload func() []byte
		fds     func() []int
		want    error
	}{
		{"descriptor missing", func() []byte { b, _ := json.Marshal(hello()); return b },
			func() []int { return []int{memfdOf(t, 256*4096), goodBitmap()} }, ErrProtocol},
		{"memfd smaller than announced", func() []byte { b, _ := json.Marshal(hello()); return b },
			func() []int { return []int{memfdOf(t, 4096), goodBitmap(), memfdOf(t, 1)} }, ErrProtocol},
		{"bitmap of other pages", func() []byte { b, _ := json.Marshal(hello()); return b },
			func() []int {
				fd := memfdOf(t, bmSize)
				mem, _ := unix.Mmap(fd, 0, int(bmSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
				writeBitmapHeader(mem, []int{999}, offsets)
				unix.Munmap(mem)
				return []int{memfdOf(t, 256*4096), fd, memfdOf(t, 1)}
			}, ErrProtocol},
		{"not JSON", func() []byte { return []byte("\x00\x01garbage") },
			func() []int { return []int{memfdOf(t, 4096)} }, ErrProtocol},
		{"unknown field", func() []byte { return []byte(`{"version":1,"evil":true}`) },
			func() []int { return nil }, ErrProtocol},
		{"server error", nil, nil, ErrBusy},
	} {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "hostile.sock")
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			before := openFDs(t)
			var fds []int
			if c.fds != nil {
				fds = c.fds()
			}
			served := make(chan error, 1)
			go func() {
				conn, err := ln.AcceptUnix()
				if err != nil {
					closeFDs(fds)
					served <- err
					return
				}
				if _, err = readFrame(conn, time.Now().Add(10*time.Second), 0, 4, 0); err == nil {
					if c.payload == nil {
						err = writeFrame(conn, msgError, encodeError(codeBusy, "busy"), nil, time.Now().Add(10*time.Second))
					} else {
						err = writeFrame(conn, msgHello|replyBit, c.payload(), fds, time.Now().Add(10*time.Second))
					}
				}
				closeFDs(fds) // the server's copies
				conn.Close()
				served <- err
			}()
			_, err = Attach(ctxT(t, 20*time.Second), sock, AttachOptions{})
			if !errors.Is(err, c.want) {
				t.Fatalf("Attach: %v, want %v", err, c.want)
			}
			if err := <-served; err != nil {
				t.Fatalf("hostile server: %v", err)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d descriptors open after the refused attach, %d before", after, before)
			}
		})
	}
}
