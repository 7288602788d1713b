package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const (
	uuidOne = "11111111-1111-1111-1111-111111111111"
	uuidTwo = "22222222-2222-2222-2222-222222222222"
)

// uuidMigration runs one migration between two `migctl serve` processes
// with the given UUIDs ("" = none) and validate-uuid set on the source
// only, as QEMU's do_test_validate_uuid does, and returns both.
func uuidMigration(t *testing.T, srcUUID, dstUUID string, validate bool) (src, dst *trustProc) {
	t.Helper()
	g := func(u string) string {
		s := "--guest=size=16M,dirty-rate=4M,seed=11"
		if u != "" {
			s += ",uuid=" + u
		}
		return s
	}
	src = startServeArgs(t, binary, "src", false, g(srcUUID))
	dst = startServeArgs(t, binary, "dst", false, g(dstUUID), "--destination")
	for _, c := range []struct {
		p    *trustProc
		want string
	}{{src, srcUUID}, {dst, dstUUID}} {
		if c.want == "" {
			c.want = "00000000-0000-0000-0000-000000000000"
		}
		var u struct{ UUID string }
		if err := json.Unmarshal(c.p.ok(`{"execute":"query-uuid"}`), &u); err != nil || u.UUID != c.want {
			t.Fatalf("query-uuid: %+v %v, want %s", u, err, c.want)
		}
	}
	// exit-on-error stays at its default (true), as in QEMU's test.
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}`)
	port := listenPort(t, dst.info())
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1000000}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"validate-uuid","state":%v}]}}`, validate))
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	return src, dst
}

// waitExit waits for a process to exit and returns its status.
func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(60 * time.Second):
		t.Fatal("the destination did not exit")
		return -1
	}
}

// QEMU's four validate-uuid qtests (/migration/validate_uuid,
// validate_uuid_error, validate_uuid_src_not_set, validate_uuid_dst_not_set)
// across two `migctl serve` processes: the capability is set on the source
// only; the destination compares whenever a UUID arrives.
func TestValidateUUID(t *testing.T) {
	t.Run("match", func(t *testing.T) {
		src, dst := uuidMigration(t, uuidOne, uuidOne, true)
		src.waitStatus("completed")
		dst.waitStatus("completed")
	})
	t.Run("mismatch", func(t *testing.T) {
		src, dst := uuidMigration(t, uuidOne, uuidTwo, true)
		src.waitStatus("failed")
		want := "UUID received is " + uuidOne + " and local is " + uuidTwo
		if desc := fmt.Sprint(src.info()["error-desc"]); !strings.Contains(desc, want) {
			t.Errorf("source error-desc %q does not say %q", desc, want)
		}
		// exit-on-error: the destination process fails, as QEMU's does.
		if code := waitExit(t, dst.cmd); code != 1 {
			t.Errorf("destination exit status %d, want 1", code)
		}
		if !strings.Contains(dst.stderr.String(), want) {
			t.Errorf("destination stderr does not say %q:\n%s", want, dst.stderr)
		}
	})
	t.Run("destination without", func(t *testing.T) {
		src, dst := uuidMigration(t, uuidOne, "", true)
		src.waitStatus("completed")
		dst.waitStatus("completed")
		if want := "UUID is received " + uuidOne + ", but local uuid isn't set"; !strings.Contains(dst.stderr.String(), want) {
			t.Errorf("destination did not warn %q:\n%s", want, dst.stderr)
		}
	})
	t.Run("source without", func(t *testing.T) {
		src, dst := uuidMigration(t, "", uuidTwo, true)
		src.waitStatus("completed")
		dst.waitStatus("completed")
	})
	// The capability is the source's: off, the UUID is not sent, so
	// different UUIDs do not matter.
	t.Run("capability off", func(t *testing.T) {
		src, dst := uuidMigration(t, uuidOne, uuidTwo, false)
		src.waitStatus("completed")
		dst.waitStatus("completed")
		if strings.Contains(dst.stderr.String(), "UUID") {
			t.Errorf("destination saw a UUID:\n%s", dst.stderr)
		}
	})
}
