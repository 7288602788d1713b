package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// chunks gives every stream a page-aligned piece, end to end, the last
// ending at n; the expectations are worked out by hand.
func TestChunks(t *testing.T) {
	cases := []struct {
		n       int64
		streams int
		want    []header
	}{
		{8192, 1, []header{{0, 8192}}},
		{8192, 2, []header{{0, 4096}, {4096, 4096}}},
		{10000, 2, []header{{0, 8192}, {8192, 1808}}},
		{16384, 4, []header{{0, 4096}, {4096, 4096}, {8192, 4096}, {12288, 4096}}},
		{4096, 3, []header{{0, 4096}, {4096, 0}, {4096, 0}}},
		{3 * 4096, 2, []header{{0, 8192}, {8192, 4096}}},
	}
	for _, c := range cases {
		got := chunks(c.n, c.streams)
		if len(got) != len(c.want) {
			t.Errorf("chunks(%d, %d) = %v, want %v", c.n, c.streams, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("chunks(%d, %d) = %v, want %v", c.n, c.streams, got, c.want)
				break
			}
		}
	}
}

// A header outside the region is refused before any slice is taken.
func TestParseHeaderBounds(t *testing.T) {
	const size = 1 << 20
	cases := []struct {
		off, length uint64
		ok          bool
	}{
		{0, size, true},
		{size, 0, true},
		{4096, size - 4096, true},
		{4096, size - 4095, false},
		{size + 1, 0, false},
		{1 << 63, 1 << 63, false}, // the sum wraps around
		{0, ^uint64(0), false},
	}
	for _, c := range cases {
		_, err := parseHeader(header{c.off, c.length}.marshal(), size)
		if (err == nil) != c.ok {
			t.Errorf("parseHeader(offset %d, length %d) in %d bytes: err %v, want ok=%v", c.off, c.length, size, err, c.ok)
		}
		if err != nil && !errors.Is(err, errHeader) {
			t.Errorf("parseHeader error %v is not errHeader", err)
		}
	}
	if _, err := parseHeader(make([]byte, 15), size); err == nil {
		t.Error("a 15-byte header was accepted")
	}
}

// Bytes sent over 1..4 real loopback streams land in the receiver's
// pre-faulted region at the sender's offsets, and nothing beyond them is
// written.
func TestSendReceive(t *testing.T) {
	for _, backing := range []string{backingAnon, backingMemfd} {
		for _, streams := range []int{1, 3, 4} {
			t.Run(backing+"/"+strconv.Itoa(streams), func(t *testing.T) {
				const size = 4 << 20
				n := int64(size - 3*pageSize - 100) // not a multiple of a page
				reg, err := mapRegion(size, backing)
				if err != nil {
					t.Fatal(err)
				}
				defer reg.Close()
				if err := prefault(t.Context(), reg.Mem); err != nil {
					t.Fatal(err)
				}
				ln, err := listenLoopback(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				type res struct {
					n   int64
					err error
				}
				done := make(chan res, 1)
				go func() {
					got, err := receive(t.Context(), ln, reg.Mem, streams)
					done <- res{got, err}
				}()
				buf, err := filledBuffer(n)
				if err != nil {
					t.Fatal(err)
				}
				defer buf.Close()
				data := buf.Mem
				took, err := send(t.Context(), ln.Addr().String(), data, streams)
				if err != nil {
					t.Fatal(err)
				}
				r := <-done
				if r.err != nil {
					t.Fatal(r.err)
				}
				if r.n != n || took <= 0 {
					t.Fatalf("received %d bytes in %v, want %d", r.n, took, n)
				}
				if !bytes.Equal(reg.Mem[:n], data) {
					t.Fatal("the region does not hold the bytes sent at their offsets")
				}
				if !bytes.Equal(reg.Mem[n:], make([]byte, size-n)) {
					t.Fatal("bytes were written beyond the data")
				}
			})
		}
	}
}

// A receiver waiting for a stream that never comes ends with its
// context, saying which stream it waited for.
func TestReceiveCancelled(t *testing.T) {
	reg, err := mapRegion(1<<20, backingAnon)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	ln, err := listenLoopback(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancelCause(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := receive(ctx, ln, reg.Mem, 2)
		done <- err
	}()
	buf, err := filledBuffer(8192)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	data := buf.Mem
	// One stream of the two: its answer arrives, so the receiver has it.
	if err := sendOne(t.Context(), ln.Addr().String(), header{0, 8192}, data); err != nil {
		t.Fatal(err)
	}
	stopped := errors.New("test stopped the receiver")
	cancel(stopped)
	err = <-done
	if !errors.Is(err, stopped) {
		t.Fatalf("receive returned %v, want the context's cause", err)
	}
}

// write leaves exactly the bytes in the file.
func TestWriteFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out")
	buf, err := filledBuffer(writeChunk*2 + 12345)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	data := buf.Mem
	took, err := writeFile(t.Context(), path, data)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if took <= 0 || !bytes.Equal(got, data) {
		t.Fatalf("the file holds %d bytes (took %v), want the %d written", len(got), took, len(data))
	}
}

// The command's line protocol, as the side-by-side driver reads it: recv
// says ready with an address, send moves the bytes, recv says done with
// the byte count.
func TestCommandLines(t *testing.T) {
	pr, pw := io.Pipe()
	recvErr := make(chan error, 1)
	go func() {
		err := run(t.Context(), []string{"recv", "-region", "2097152", "-streams", "2", "-backing", "memfd"}, pw)
		pw.CloseWithError(err)
		recvErr <- err
	}()
	sc := bufio.NewScanner(pr)
	var ready event
	if !sc.Scan() || json.Unmarshal(sc.Bytes(), &ready) != nil || ready.Event != "ready" || ready.Addr == "" {
		t.Fatalf("first recv line %q, want a ready event with an address", sc.Text())
	}
	var out bytes.Buffer
	if err := run(t.Context(), []string{"send", "-addr", ready.Addr, "-bytes", "1000000", "-streams", "2"}, &out); err != nil {
		t.Fatal(err)
	}
	var res result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Bytes != 1000000 || res.Seconds <= 0 {
		t.Fatalf("send printed %q, want bytes 1000000 and a positive time", out.String())
	}
	var done event
	if !sc.Scan() || json.Unmarshal(sc.Bytes(), &done) != nil || done.Event != "done" || done.Bytes != 1000000 {
		t.Fatalf("second recv line %q, want done with 1000000 bytes", sc.Text())
	}
	if err := <-recvErr; err != nil {
		t.Fatal(err)
	}
}

// Mistakes in the command line are usage errors.
func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"copy"},
		{"recv"},
		{"recv", "-region", "4096", "-streams", "0"},
		{"send", "-addr", "127.0.0.1:1"},
		{"write", "-bytes", "10"},
		{"recv", "-region", "4096", "-timeout", "0s"},
	} {
		err := run(t.Context(), args, io.Discard)
		var ue usageError
		if !errors.As(err, &ue) {
			t.Errorf("run %q: %v, want a usage error", args, err)
		}
	}
}

// FuzzParseHeader: any 16 bytes either fail or describe a range inside
// the region.
func FuzzParseHeader(f *testing.F) {
	f.Add(header{0, 4096}.marshal(), 8192)
	f.Add(header{1 << 63, 1 << 63}.marshal(), 8192)
	f.Add([]byte{1, 2, 3}, 0)
	f.Fuzz(func(t *testing.T, b []byte, size int) {
		if size < 0 {
			return
		}
		h, err := parseHeader(b, size)
		if err != nil {
			return
		}
		if h.Offset+h.Length > uint64(size) || h.Offset+h.Length < h.Offset {
			t.Fatalf("accepted %+v for a region of %d bytes", h, size)
		}
	})
}
