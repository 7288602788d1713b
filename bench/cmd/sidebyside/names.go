package main

// QMP and QEMU command-line words the driver uses. They equal names of
// migctl's spec (triggers, states) but here they are QEMU's vocabulary,
// spoken to QEMU and to migctl serve alike; contract_test.go's
// notSpecNames lists them.
const (
	qmpMigrate = "migrate" // the QMP command starting an outgoing migration
	qmpCont    = "cont"    // the QMP command running a guest

	// QEMU's MigrationStatus values that end a migration (query-migrate).
	statusCompleted = "completed"
	statusFailed    = "failed"
	statusCancelled = "cancelled"

	// displayNone is the value of QEMU's -display option for no display.
	displayNone = "none"
)
