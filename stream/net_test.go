package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (src, dst net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	src, err = net.Dial("tcp", ln.Addr().String())
	must(t, err)
	dst, err = ln.Accept()
	must(t, err)
	t.Cleanup(func() { src.Close(); dst.Close() })
	return src, dst
}

// guestRAM maps anonymous memory for the destination's blocks, as a loader
// would, so pages are read straight into mapped guest memory.
func guestRAM(t *testing.T) map[string][]byte {
	t.Helper()
	mem := map[string][]byte{}
	for _, b := range testBlocks {
		m, err := unix.Mmap(-1, 0, int(b.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		must(t, err)
		t.Cleanup(func() { unix.Munmap(m) })
		mem[b.Name] = m
	}
	return mem
}

// liveSource writes a live-migration stream: return path, PINGs, handshake,
// three RAM passes, devices. It returns the RAM image it sent.
func liveSource(w io.Writer, hs *Handshake) (map[string][]byte, error) {
	img := map[string][]byte{"pc.ram": make([]byte, ramSize), romName: make([]byte, romSize)}
	e := NewEncoder(w)
	steps := []func() error{
		func() error { return e.WriteHeader(guestName) },
		e.OpenReturnPath,
		func() error { return e.Ping(1) },
		func() error { return e.WriteHandshake(hs) },
		func() error { return e.StartRAM(testPS, testBlocks) },
		e.Flush,
	}
	for pass := range 3 {
		if pass < 2 {
			steps = append(steps, e.BeginRAMPart)
		} else {
			steps = append(steps, func() error { return e.Ping(2) }, e.BeginRAMEnd)
		}
		for _, b := range testBlocks {
			for off := uint64(pass) * testPS; off < b.Size; off += 2 * testPS {
				name, off, pass := b.Name, off, pass
				steps = append(steps, func() error {
					if (off/testPS+uint64(pass))%3 == 0 {
						clear(img[name][off : off+testPS])
						return e.PutZero(name, off)
					}
					p := bytes.Repeat([]byte{byte(pass + 1), byte(off >> 12)}, testPS/2)
					copy(img[name][off:], p)
					return e.PutPage(name, off, p)
				})
			}
		}
		steps = append(steps, e.CloseRAMSection, e.Flush)
	}
	steps = append(steps,
		func() error { return e.WriteDevice("cpu", 0, 1, []byte("registers")) },
		e.Close)
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// readReturnPath collects return-path messages until SHUT or an error.
func readReturnPath(r io.Reader, out chan<- []RPMessage) {
	var got []RPMessage
	for {
		m, err := ReadRP(r)
		if err != nil {
			break
		}
		got = append(got, m)
		if m.Type == RPShut {
			break
		}
	}
	out <- got
}

// TestLoopbackMigration runs a source and a destination over loopback TCP:
// the stream one way, PONGs and SHUT the other way.
func TestLoopbackMigration(t *testing.T) {
	src, dst := tcpPair(t)
	type result struct {
		img map[string][]byte
		err error
	}
	sent := make(chan result, 1)
	go func() {
		img, err := liveSource(src, testHandshake())
		sent <- result{img, err}
	}()
	rp := make(chan []RPMessage, 1)
	go readReturnPath(src, rp)

	mem := guestRAM(t)
	local := testHandshake()
	local.Protocol, local.Side = HandshakeProtocol, SideDestination
	d := NewDecoder(dst, Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": ramSize, romName: romSize}, RequireHandshake: true})
	var kinds []Kind
	for {
		rec, err := d.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, rec.Kind)
		switch rec.Kind {
		case KindCommand:
			if rec.Command == CmdPing {
				must(t, WriteRP(dst, NewPong(uint32(rec.Value))))
			}
		case KindHandshake:
			must(t, local.Check(rec.Handshake))
		case KindPage:
			must(t, d.ReadPage(mem[rec.Block][rec.Offset:rec.Offset+testPS]))
		case KindZero:
			clear(mem[rec.Block][rec.Offset : rec.Offset+testPS])
		case KindDevice:
			if string(rec.Data) != "registers" {
				t.Errorf("device payload %q", rec.Data)
			}
		}
	}
	must(t, WriteRP(dst, NewShut(0)))

	res := <-sent
	must(t, res.err)
	for name, want := range res.img {
		if !bytes.Equal(mem[name], want) {
			t.Errorf("destination RAM %q differs from the source's", name)
		}
	}
	got := <-rp
	want := []RPMessage{NewPong(1), NewPong(2), NewShut(0)}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("return path carried %v, want %v", got, want)
	}
	if kinds[len(kinds)-1] != KindVMDesc {
		t.Errorf("last record %v, want the vmdesc", kinds[len(kinds)-1])
	}
}

// TestLoopbackHandshakeRejected: the destination refuses an incompatible
// source before loading any page and tells it why on the return path.
func TestLoopbackHandshakeRejected(t *testing.T) {
	src, dst := tcpPair(t)
	done := make(chan error, 1)
	hs := testHandshake()
	hs.Capabilities["multifd"] = true
	go func() {
		_, err := liveSource(src, hs)
		done <- err
	}()
	rp := make(chan []RPMessage, 1)
	go readReturnPath(src, rp)

	local := testHandshake()
	local.Protocol, local.Side = HandshakeProtocol, SideDestination
	d := NewDecoder(dst, Limits{PageSize: testPS, Blocks: local.RAMBlocks, RequireHandshake: true})
	for {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind == KindPage || rec.Kind == KindZero {
			t.Fatal("a page came before the handshake")
		}
		if rec.Kind == KindHandshake {
			err := local.Check(rec.Handshake)
			if !errors.Is(err, ErrHandshake) {
				t.Fatalf("Check: %v", err)
			}
			must(t, WriteRP(dst, NewFailReason(err.Error())))
			must(t, WriteRP(dst, NewShut(1)))
			break
		}
	}
	got := <-rp
	if len(got) != 2 || got[0].Type != RPFailReason || got[1].String() != "SHUT(1)" ||
		!bytes.Contains(got[0].Data, []byte(`capability "multifd" is off here but on on the peer`)) {
		t.Errorf("return path carried %v", got)
	}
	dst.Close() // the source's writes now fail or drain; either way it ends
	<-done
}
