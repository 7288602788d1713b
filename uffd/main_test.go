package uffd

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
	case "nobody":
		os.Exit(nobodyMain())
	default:
		os.Exit(helperMain()) // a re-executed test binary: the faulting process
	}
	goleak.VerifyTestMain(m)
}
