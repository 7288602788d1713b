package transport

import (
	"encoding/json"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func TestParse(t *testing.T) {
	sh := func(cmd string) []string { return []string{"/bin/sh", "-c", cmd} }
	tests := []struct {
		uri       string
		want      Addr
		canonical string // String() of the result; "" means uri itself
	}{
		{uri: "tcp:127.0.0.1:4446", want: Addr{Scheme: "tcp", Host: "127.0.0.1", Port: 4446}},
		{uri: "tcp:[::1]:4446", want: Addr{Scheme: "tcp", Host: "::1", Port: 4446}},
		{uri: "tcp:[fe80::1%eth0]:1", want: Addr{Scheme: "tcp", Host: "fe80::1%eth0", Port: 1}},
		{uri: "tcp:host.example_1-a:0", want: Addr{Scheme: "tcp", Host: "host.example_1-a", Port: 0}},
		{uri: "tcp::4446", want: Addr{Scheme: "tcp", Host: "", Port: 4446}},
		{uri: "tcp:0:65535", want: Addr{Scheme: "tcp", Host: "0", Port: 65535}},
		{uri: "tcp:localhost:04446", want: Addr{Scheme: "tcp", Host: "localhost", Port: 4446}, canonical: "tcp:localhost:4446"},
		{uri: "unix:/run/mig.sock", want: Addr{Scheme: "unix", Path: "/run/mig.sock"}},
		{uri: "unix:rel/p:a,b", want: Addr{Scheme: "unix", Path: "rel/p:a,b"}},
		{uri: "fd:7", want: Addr{Scheme: "fd", FD: 7}},
		{uri: "fd:0", want: Addr{Scheme: "fd", FD: 0}},
		{uri: "fd:migfd", want: Addr{Scheme: "fd", FD: -1, FDName: "migfd"}},
		{uri: "file:/tmp/m", want: Addr{Scheme: "file", Path: "/tmp/m"}},
		{uri: "file:/tmp/m,offset=4096", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 4096}},
		{uri: "file:/tmp/m,offset=0x1000", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 4096}, canonical: "file:/tmp/m,offset=4096"},
		{uri: "file:/tmp/m,offset=0X1b", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 27}, canonical: "file:/tmp/m,offset=27"},
		{uri: "file:/tmp/m,offset=4K", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 4096}, canonical: "file:/tmp/m,offset=4096"},
		{uri: "file:/tmp/m,offset=2m", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 2 << 20}, canonical: "file:/tmp/m,offset=2097152"},
		{uri: "file:/tmp/m,offset=7E", want: Addr{Scheme: "file", Path: "/tmp/m", Offset: 7 << 60}, canonical: "file:/tmp/m,offset=8070450532247928832"},
		{uri: "file:/tmp/m,offset=0", want: Addr{Scheme: "file", Path: "/tmp/m"}, canonical: "file:/tmp/m"},
		{uri: "exec:cat > /tmp/m", want: Addr{Scheme: "exec", Args: sh("cat > /tmp/m")}},
		{uri: "exec:nc -l 4446 | gzip -d", want: Addr{Scheme: "exec", Args: sh("nc -l 4446 | gzip -d")}},
		{uri: "rdma:192.168.0.1:4446", want: Addr{Scheme: "rdma", Host: "192.168.0.1", Port: 4446}},
		{uri: "rdma:[::1]:1", want: Addr{Scheme: "rdma", Host: "::1", Port: 1}},
		{uri: "vsock:3:4446", want: Addr{Scheme: "vsock", CID: 3, Port: 4446}},
		{uri: "vsock:4294967295:4294967295", want: Addr{Scheme: "vsock", CID: 4294967295, Port: 4294967295}},
	}
	for _, tc := range tests {
		got, err := Parse(tc.uri)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.uri, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Parse(%q) = %#v, want %#v", tc.uri, got, tc.want)
		}
		canon := tc.canonical
		if canon == "" {
			canon = tc.uri
		}
		if s := got.String(); s != canon {
			t.Errorf("Parse(%q).String() = %q, want %q", tc.uri, s, canon)
		}
	}
}

func TestParseErrors(t *testing.T) {
	long := "/" + strings.Repeat("x", 107)
	tests := []struct{ uri, err string }{
		{"", "unknown migration protocol: "},
		{"defer", "unknown migration protocol: defer"},
		{"foo:bar", "unknown migration protocol: foo:bar"},
		{"TCP:1.2.3.4:5", "unknown migration protocol: TCP:1.2.3.4:5"},
		{"tcp:1.2.3.4", "error parsing address '1.2.3.4': expected HOST:PORT"},
		{"tcp:1.2.3.4:", "error parsing port in address '1.2.3.4:': missing port number"},
		{"tcp:1.2.3.4:65536", "error parsing port in address '1.2.3.4:65536': port 65536 is out of range 0..65535"},
		{"tcp:1.2.3.4:99999999999999999999999", "error parsing port in address '1.2.3.4:99999999999999999999999': port 99999999999999999999999 is out of range 0..65535"},
		{"tcp:1.2.3.4:http", `error parsing port in address '1.2.3.4:http': port "http" is not a decimal number (service names are not accepted)`},
		{"tcp:1.2.3.4:-1", `error parsing port in address '1.2.3.4:-1': port "-1" is not a decimal number (service names are not accepted)`},
		{"tcp:::1:4446", "error parsing address '::1:4446': an IPv6 address needs brackets, e.g. [::1]:4446"},
		{"tcp:[::1:4446", "error parsing IPv6 address '[::1:4446': write it as [ADDRESS]:PORT"},
		{"tcp:[::1]4446", "error parsing IPv6 address '[::1]4446': write it as [ADDRESS]:PORT"},
		{"tcp:[::1]:", "error parsing port in address '[::1]:': missing port number"},
		{"tcp:[1.2.3.4]:5", `error parsing IPv6 address '[1.2.3.4]:5': "1.2.3.4" is not an IPv6 address`},
		{"tcp:[]:5", `error parsing IPv6 address '[]:5': "" is not an IPv6 address`},
		{"tcp:h:1,ipv4=on", "error parsing address 'h:1,ipv4=on': socket options after ',' (ipv4=on) are not supported"},
		{"tcp:bad host:1", `error parsing address 'bad host:1': host "bad host" contains ' ', which is not allowed in a host name`},
		{"tcp:" + strings.Repeat("a", 254) + ":1", "error parsing address '" + strings.Repeat("a", 254) + ":1': host name is 254 bytes long; the limit is 253"},
		{"rdma:1.2.3.4", "error parsing address '1.2.3.4': expected HOST:PORT"},
		{"unix:", "invalid Unix socket address: write unix:PATH, e.g. unix:/run/migration.sock"},
		{"unix:" + long, "UNIX socket path '" + long + "' is too long: 108 bytes, it must be less than 108"},
		{"unix:/a\x00b", "unix: socket path contains a NUL byte"},
		{"fd:", "invalid file descriptor: write fd:N or fd:NAME"},
		{"fd:12abc", "Invalid file descriptor number '12abc'"},
		{"fd:2147483648", "Invalid file descriptor number '2147483648'"},
		{"fd:a b", `fd: descriptor name "a b" contains a space or control character`},
		{"fd:" + strings.Repeat("n", 256), "fd: descriptor name is 256 bytes long; the limit is 255"},
		{"file:", "file: migration URI has no path; write file:PATH[,offset=N]"},
		{"file:,offset=5", "file: migration URI has no path; write file:PATH[,offset=N]"},
		{"file:/x,offset=0x20M", "file URI has bad offset 0x20M: Invalid argument"},
		{"file:/x,offset=", "file URI has bad offset : Invalid argument"},
		{"file:/x,offset=-1", "file URI has bad offset -1: Invalid argument"},
		{"file:/x,offset=+1", "file URI has bad offset +1: Invalid argument"},
		{"file:/x,offset=1.5M", "file URI has bad offset 1.5M: Invalid argument"},
		{"file:/x,offset=K", "file URI has bad offset K: Invalid argument"},
		{"file:/x,offset=0x", "file URI has bad offset 0x: Invalid argument"},
		{"file:/x,offset=12Q", "file URI has bad offset 12Q: Invalid argument"},
		{"file:/x,offset=8E", "file URI has bad offset 8E: Numerical result out of range"},
		{"file:/x,offset=16E", "file URI has bad offset 16E: Numerical result out of range"},
		{"file:/x,offset=99999999999999999999", "file URI has bad offset 99999999999999999999: Numerical result out of range"},
		{"file:/x,offset=0x8000000000000000", "file URI has bad offset 0x8000000000000000: Numerical result out of range"},
		{"file:/x,offset=0x10000000000000000", "file URI has bad offset 0x10000000000000000: Numerical result out of range"},
		{"file:/a,b,offset=1,offset=2", "file URI has bad offset 1,offset=2: Invalid argument"},
		{"exec:", "exec: migration URI has an empty command line; write exec:CMDLINE, e.g. exec:cat > /tmp/mig"},
		{"exec:   ", "exec: migration URI has an empty command line; write exec:CMDLINE, e.g. exec:cat > /tmp/mig"},
		{"vsock:3", "error parsing address '3': write vsock:CID:PORT"},
		{"vsock::3", "error parsing address ':3': write vsock:CID:PORT"},
		{"vsock:x:1", `error parsing address 'x:1': bad CID: port "x" is not a decimal number (service names are not accepted)`},
		{"vsock:3:4294967296", "error parsing address '3:4294967296': port 4294967296 is out of range 0..4294967295"},
	}
	for _, tc := range tests {
		a, err := Parse(tc.uri)
		if err == nil {
			t.Errorf("Parse(%q) = %#v, want error %q", tc.uri, a, tc.err)
			continue
		}
		if err.Error() != tc.err {
			t.Errorf("Parse(%q) error\n got %q\nwant %q", tc.uri, err.Error(), tc.err)
		}
	}
	if _, err := Parse(strings.Repeat("x", maxURILen+1)); err == nil {
		t.Error("Parse accepted an over-long URI")
	}
}

// genAddr generates valid addresses of every scheme.
func genAddr() *rapid.Generator[Addr] {
	host := rapid.OneOf(
		rapid.StringMatching(`[a-zA-Z0-9._-]{0,30}`),
		rapid.Custom(func(t *rapid.T) string {
			b := rapid.SliceOfN(rapid.Byte(), 16, 16).Draw(t, "v6")
			return netip.AddrFrom16([16]byte(b)).String()
		}),
	)
	path := rapid.StringMatching(`[/a-zA-Z0-9._:-][/a-zA-Z0-9._: -]{0,60}`)
	return rapid.Custom(func(t *rapid.T) Addr {
		switch rapid.SampledFrom([]string{"tcp", "rdma", "unix", "fd", "fdname", "file", "exec", "vsock"}).Draw(t, "scheme") {
		case "tcp":
			return Addr{Scheme: "tcp", Host: host.Draw(t, "host"), Port: rapid.IntRange(0, 65535).Draw(t, "port")}
		case "rdma":
			return Addr{Scheme: "rdma", Host: host.Draw(t, "host"), Port: rapid.IntRange(0, 65535).Draw(t, "port")}
		case "unix":
			return Addr{Scheme: "unix", Path: path.Draw(t, "path")}
		case "fd":
			return Addr{Scheme: "fd", FD: rapid.IntRange(0, 1<<31-1).Draw(t, "fd")}
		case "fdname":
			return Addr{Scheme: "fd", FD: -1, FDName: rapid.StringMatching(`[a-zA-Z_][a-zA-Z0-9_.:-]{0,30}`).Draw(t, "name")}
		case "file":
			return Addr{Scheme: "file", Path: path.Draw(t, "path"), Offset: rapid.Int64Min(0).Draw(t, "off")}
		case "exec":
			return Addr{Scheme: "exec", Args: []string{"/bin/sh", "-c", rapid.StringMatching(`[ -~]*[!-~][ -~]*`).Draw(t, "cmd")}}
		default:
			return Addr{Scheme: "vsock", CID: rapid.Uint32().Draw(t, "cid"), Port: rapid.IntRange(0, 1<<32-1).Draw(t, "port")}
		}
	})
}

// TestStringParseRoundTrip: Parse(a.String()) gives a back, and so does
// FromChannel(ToChannel(a)) through JSON.
func TestStringParseRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		a := genAddr().Draw(t, "addr")
		got, err := Parse(a.String())
		if err != nil {
			t.Fatalf("Parse(%q): %v", a.String(), err)
		}
		if !reflect.DeepEqual(got, a) {
			t.Fatalf("Parse(%q) = %#v, want %#v", a.String(), got, a)
		}
		js, err := json.Marshal(ToChannel(a))
		if err != nil {
			t.Fatal(err)
		}
		m, err := DecodeMigrationAddress(js)
		if err != nil {
			t.Fatalf("decode %s: %v", js, err)
		}
		got, err = FromChannel(m)
		if err != nil {
			t.Fatalf("FromChannel(%s): %v", js, err)
		}
		if !reflect.DeepEqual(got, a) {
			t.Fatalf("FromChannel(%s) = %#v, want %#v", js, got, a)
		}
	})
}

func TestExecStringQuotesArgv(t *testing.T) {
	a := Addr{Scheme: "exec", Args: []string{"/bin/printf", "%s|", "it's", "a b"}}
	want := `exec:'/bin/printf' '%s|' 'it'\''s' 'a b'`
	if s := a.String(); s != want {
		t.Fatalf("String() = %q, want %q", s, want)
	}
}

func TestFromChannel(t *testing.T) {
	tests := []struct {
		json string
		want string // canonical URI
	}{
		{`{"transport":"socket","type":"inet","host":"10.0.0.2","port":"4446"}`, "tcp:10.0.0.2:4446"},
		{`{"transport":"socket","type":"inet","host":"0","port":"4446"}`, "tcp:0:4446"},
		{`{"transport":"socket","type":"inet","host":"::1","port":"4446","keep-alive":true,"numeric":true}`, "tcp:[::1]:4446"},
		{`{"transport":"socket","type":"unix","path":"/run/m.sock"}`, "unix:/run/m.sock"},
		{`{"transport":"socket","type":"vsock","cid":"3","port":"1234"}`, "vsock:3:1234"},
		{`{"transport":"socket","type":"fd","str":"migfd"}`, "fd:migfd"},
		{`{"transport":"socket","type":"fd","str":"5"}`, "fd:5"},
		{`{"transport":"exec","args":["/bin/sh","-c","cat > /tmp/m"]}`, "exec:cat > /tmp/m"},
		{`{"transport":"rdma","host":"192.168.1.1","port":"4446"}`, "rdma:192.168.1.1:4446"},
		{`{"transport":"file","filename":"/tmp/m","offset":4096}`, "file:/tmp/m,offset=4096"},
		{`{"transport":"file","filename":"/tmp/m"}`, "file:/tmp/m"},
	}
	for _, tc := range tests {
		m, err := DecodeMigrationAddress([]byte(tc.json))
		if err != nil {
			t.Errorf("decode %s: %v", tc.json, err)
			continue
		}
		a, err := FromChannel(m)
		if err != nil {
			t.Errorf("FromChannel(%s): %v", tc.json, err)
			continue
		}
		if a.String() != tc.want {
			t.Errorf("FromChannel(%s) = %q, want %q", tc.json, a.String(), tc.want)
		}
	}

	// A filename is verbatim: ",offset=" in it is not an option.
	a, err := FromChannel(MigrationAddress{Transport: "file", Filename: "/tmp/a,offset=zz"})
	if err != nil || a.Path != "/tmp/a,offset=zz" || a.Offset != 0 {
		t.Errorf("FromChannel(file with ,offset= in the name) = %#v, %v", a, err)
	}

	bad := []struct{ json, err string }{
		{`{"transport":"socket","type":"inet","host":"h","port":4446}`, "MigrationAddress: json: cannot unmarshal number into Go struct field MigrationAddress.port of type string"},
		{`{"transport":"socket","type":"inet","host":"h","port":"4446","bogus":1}`, `MigrationAddress: json: unknown field "bogus"`},
		{`{"transport":"socket","type":"inet","host":"h","port":"x"}`, `tcp host "h": port "x" is not a decimal number (service names are not accepted)`},
		{`{"transport":"socket","type":"inet","host":"a b","port":"1"}`, `tcp host "a b": host "a b" contains ' ', which is not allowed in a host name`},
		{`{"transport":"socket","type":"inet","host":"h","port":"1","to":5}`, `transport: unsupported operation: the "to" port range is not implemented; give one port`},
		{`{"transport":"socket","type":"inet","host":"h","port":"1","ipv6":false}`, `transport: unsupported operation: "ipv4"/"ipv6": false is not implemented; give an address of the family you want`},
		{`{"transport":"socket","type":"unix","path":"x","abstract":true}`, `transport: unsupported operation: abstract unix sockets ("abstract": true) are not implemented; use a filesystem path`},
		{`{"transport":"socket","type":"unix"}`, "invalid Unix socket address: write unix:PATH, e.g. unix:/run/migration.sock"},
		{`{"transport":"socket","type":"pipe"}`, `MigrationAddress: unknown socket type "pipe"; want inet, unix, vsock or fd`},
		{`{"transport":"socket"}`, `MigrationAddress: "transport": "socket" needs "type": one of inet, unix, vsock, fd`},
		{`{"transport":"exec","args":[]}`, `MigrationAddress: "transport": "exec" needs "args" with the program first`},
		{`{"transport":"file","filename":""}`, "file: migration address has no path; write file:PATH[,offset=N]"},
		{`{"transport":"file","filename":"/x","offset":9223372036854775808}`, "file URI has bad offset 9223372036854775808: Numerical result out of range"},
		{`{"transport":"carrier-pigeon"}`, `MigrationAddress: unknown transport "carrier-pigeon"; want socket, exec, rdma or file`},
		{`{}`, `MigrationAddress: missing "transport": one of socket, exec, rdma, file`},
		{`{"transport":"file","filename":"/x"} {}`, "MigrationAddress: trailing data after the JSON object"},
	}
	for _, tc := range bad {
		m, err := DecodeMigrationAddress([]byte(tc.json))
		if err == nil {
			_, err = FromChannel(m)
		}
		if err == nil {
			t.Errorf("%s: no error, want %q", tc.json, tc.err)
			continue
		}
		if err.Error() != tc.err {
			t.Errorf("%s:\n got %q\nwant %q", tc.json, err.Error(), tc.err)
		}
	}
	_, err = FromChannel(MigrationAddress{Transport: "socket", Type: "inet", Host: "h", Port: "1", MPTCP: new(true)})
	if !errors.Is(err, ErrUnsupported) {
		t.Errorf("mptcp: got %v, want ErrUnsupported", err)
	}
}

func TestMigrationChannelJSON(t *testing.T) {
	const in = `[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"0","port":"4446"}}]`
	var chans []MigrationChannel
	if err := json.Unmarshal([]byte(in), &chans); err != nil {
		t.Fatal(err)
	}
	if len(chans) != 1 || chans[0].ChannelType != "main" {
		t.Fatalf("decoded %#v", chans)
	}
	a, err := FromChannel(chans[0].Addr)
	if err != nil || a.String() != "tcp:0:4446" {
		t.Fatalf("FromChannel = %v, %v", a, err)
	}
	out, err := json.Marshal(chans)
	if err != nil || string(out) != in {
		t.Fatalf("re-encoded\n got %s\nwant %s", out, in)
	}
}
