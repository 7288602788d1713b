package stream

import "fmt"

// Stream header (qemu-wire.md §1.2).
const (
	// Magic is the first be32 of every stream: "QEVM".
	Magic = 0x5145564d
	// Version is the only stream version written and accepted.
	Version = 3
)

// Section type bytes of the main stream (QEMU's savevm.h).
const (
	SecEOF        = 0x00 // end of the device stream
	SecStart      = 0x01 // first section of an iterable handler (RAM)
	SecPart       = 0x02 // a further section of an iterable handler
	SecEnd        = 0x03 // the last section of an iterable handler
	SecFull       = 0x04 // a device's whole state
	SecSubsection = 0x05 // only inside vmstate payloads; never at top level
	SecVMDesc     = 0x06 // the trailing JSON description, after EOF
	SecConfig     = 0x07 // machine configuration, right after the header
	SecCommand    = 0x08 // a command (be16 cmd, be16 len, data)
	SecFooter     = 0x7e // footer: be32 section id
)

// RAM record flags, OR-ed into the low bits of the be64 page offset
// (qemu-wire.md §2.1). Every flag is below the smallest supported page size.
const (
	FlagZero         = 0x002 // page of zeros: one fill byte (0) follows
	FlagMemSize      = 0x004 // RAM block list: the offset field holds the total size
	FlagPage         = 0x008 // raw page: PageSize bytes follow
	FlagEOS          = 0x010 // end of this section's RAM data
	FlagContinue     = 0x020 // same block as the previous record: no idstr
	FlagXBZRLE       = 0x040 // delta-encoded page (unsupported)
	FlagHook         = 0x080 // RDMA control point (unsupported)
	FlagCompressPage = 0x100 // zlib page of QEMU <= 9.0 (unsupported)
	FlagMultifdFlush = 0x200 // multifd barrier on the main channel

	// flagBits covers every bit QEMU may use as a flag. Bits between it and
	// the page size can only be an offset that is not page aligned.
	flagBits = 0x3ff
)

// RAM section identity: QEMU registers RAM as idstr "ram", instance 0,
// version 4 and its loader refuses any other version.
const (
	RAMIDStr   = "ram"
	RAMVersion = 4
)

// Page sizes. The target page size is carried in the handshake and the vmdesc
// (QEMU has it compiled in). It must be a power of two between MinPageSize
// (so that every flag fits below it) and MaxPageSize.
const (
	DefaultPageSize = 4096
	MinPageSize     = 1024
	MaxPageSize     = 64 << 10
)

// Length bounds shared by the Encoder and the Decoder's defaults.
const (
	// MaxIDStr is the longest section or RAM block idstr (a u8 length).
	MaxIDStr = 255
	// MaxMachineName bounds the configuration section's machine name.
	// QEMU's field is be32, real names are short; we carry the guest's
	// identity there and refuse anything longer than this.
	MaxMachineName = 4096
	// MaxVMDesc bounds the vmdesc JSON the Encoder writes:
	// analyze-migration.py looks for it only in the last 10 MiB of a file.
	MaxVMDesc = 10<<20 - 5
)

// Command is a QEMU_VM_COMMAND sub-type (qemu-wire.md §1.6).
type Command uint16

// Commands. The Encoder writes OpenReturnPath, Ping and the zero-length ones;
// the Decoder reads all of them except Packaged.
const (
	CmdOpenReturnPath  Command = 1  // no data: the destination opens the return path
	CmdPing            Command = 2  // be32 value, answered by RPPong
	CmdPostcopyAdvise  Command = 3  // 0 or 16 bytes
	CmdPostcopyListen  Command = 4  // no data
	CmdPostcopyRun     Command = 5  // no data
	CmdPostcopyDiscard Command = 6  // u8 version, u8 len, name, u8 0, N x (be64 start, be64 len)
	CmdPackaged        Command = 7  // be32 blob length; the blob follows (unsupported)
	CmdEnableColo      Command = 8  // no data
	CmdPostcopyResume  Command = 9  // no data
	CmdRecvBitmap      Command = 10 // u8 len, RAM block name
	CmdSwitchoverStart Command = 11 // no data
	cmdMax             Command = 12
)

var commandNames = [...]string{
	CmdOpenReturnPath:  "OPEN_RETURN_PATH",
	CmdPing:            "PING",
	CmdPostcopyAdvise:  "POSTCOPY_ADVISE",
	CmdPostcopyListen:  "POSTCOPY_LISTEN",
	CmdPostcopyRun:     "POSTCOPY_RUN",
	CmdPostcopyDiscard: "POSTCOPY_RAM_DISCARD",
	CmdPackaged:        "PACKAGED",
	CmdEnableColo:      "ENABLE_COLO",
	CmdPostcopyResume:  "POSTCOPY_RESUME",
	CmdRecvBitmap:      "RECV_BITMAP",
	CmdSwitchoverStart: "SWITCHOVER_START",
}

// String returns QEMU's name for the command, e.g. "PING".
func (c Command) String() string {
	if c > 0 && c < cmdMax {
		return commandNames[c]
	}
	return fmt.Sprintf("COMMAND(%d)", uint16(c))
}

// checkCommand reports why data is not a valid payload for cmd, or "" if it
// is. It applies QEMU's length table plus the internal consistency of the
// variable-length commands.
func checkCommand(cmd Command, data []byte) string {
	n := len(data)
	switch cmd {
	case CmdOpenReturnPath, CmdPostcopyListen, CmdPostcopyRun, CmdEnableColo,
		CmdPostcopyResume, CmdSwitchoverStart:
		if n != 0 {
			return fmt.Sprintf("%v carries %d bytes, want 0", cmd, n)
		}
	case CmdPing, CmdPackaged:
		if n != 4 {
			return fmt.Sprintf("%v carries %d bytes, want 4", cmd, n)
		}
	case CmdPostcopyAdvise:
		if n != 0 && n != 16 {
			return fmt.Sprintf("%v carries %d bytes, want 0 or 16", cmd, n)
		}
	case CmdRecvBitmap:
		if n < 2 || int(data[0]) != n-1 {
			return fmt.Sprintf("%v carries %d bytes that are not a u8-counted block name", cmd, n)
		}
	case CmdPostcopyDiscard:
		if n < 3 || data[0] != 0 {
			return fmt.Sprintf("%v carries %d bytes with no version 0 header", cmd, n)
		}
		nl := int(data[1])
		if nl == 0 || n < 3+nl || data[2+nl] != 0 || (n-3-nl)%16 != 0 {
			return fmt.Sprintf("%v carries %d bytes that are not name + (start, length) pairs", cmd, n)
		}
	default:
		return fmt.Sprintf("unknown command %d", uint16(cmd))
	}
	return ""
}

// Block is a RAM block as listed in the MEM_SIZE record: its idstr and its
// used length in bytes.
type Block struct {
	Name string
	Size uint64
}

// Section identifies a section: the id the sender chose, and for START and
// FULL sections the idstr, instance and version read from the header (PART
// and END sections report the values of their START).
type Section struct {
	ID       uint32
	IDStr    string
	Instance uint32
	Version  uint32
}

// Kind says what a Record holds.
type Kind uint8

// Record kinds, in roughly the order they appear in a stream.
const (
	// KindConfig: the configuration section; Record.Machine is the machine
	// name (migctl puts the guest's identity there).
	KindConfig Kind = iota + 1
	// KindSectionStart, KindSectionPart, KindSectionEnd, KindSectionFull:
	// a section header; Record.Section says which.
	KindSectionStart
	KindSectionPart
	KindSectionEnd
	KindSectionFull
	// KindMemSize: the RAM block list at the start of the RAM section;
	// Record.Blocks lists the blocks, Record.Value their total size.
	KindMemSize
	// KindPage: a raw page of Record.Block at Record.Offset. The caller must
	// call ReadPage or SkipPage before the next Next.
	KindPage
	// KindZero: a zero page of Record.Block at Record.Offset.
	KindZero
	// KindFlush: a MULTIFD_FLUSH barrier in the RAM section.
	KindFlush
	// KindEOS: the end of a RAM section's data; its footer follows.
	KindEOS
	// KindDevice: the payload of a FULL section, Record.Data.
	KindDevice
	// KindHandshake: the payload of the migctl/handshake FULL section,
	// decoded into Record.Handshake (raw JSON in Record.Data).
	KindHandshake
	// KindFooter: a section footer, already checked against the open section.
	KindFooter
	// KindCommand: a command; Record.Command and Record.Data, and for PING
	// Record.Value holds the value.
	KindCommand
	// KindEOF: the end of the device stream. A vmdesc may follow.
	KindEOF
	// KindVMDesc: the trailing vmdesc JSON in Record.Data.
	KindVMDesc
)

var kindNames = [...]string{
	KindConfig:       "config",
	KindSectionStart: "section-start",
	KindSectionPart:  "section-part",
	KindSectionEnd:   "section-end",
	KindSectionFull:  "section-full",
	KindMemSize:      "mem-size",
	KindPage:         "page",
	KindZero:         "zero",
	KindFlush:        "multifd-flush",
	KindEOS:          "eos",
	KindDevice:       "device",
	KindHandshake:    "handshake",
	KindFooter:       "footer",
	KindCommand:      "command",
	KindEOF:          "eof",
	KindVMDesc:       "vmdesc",
}

// String returns a short lower-case name such as "page".
func (k Kind) String() string {
	if int(k) < len(kindNames) && kindNames[k] != "" {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Record is one element of a decoded stream, as returned by Decoder.Next.
// Which fields are set depends on Kind. Slices (Data, Blocks) belong to the
// Decoder and are valid only until the next call to Next; copy what you keep.
type Record struct {
	Kind Kind
	// Pos is the stream byte offset at which the record starts.
	Pos int64
	// Section is the section the record opens, belongs to, or closes. It is
	// zero for records outside sections (config, command, EOF, vmdesc).
	Section Section
	// Block and Offset locate a page or zero record: the RAM block's idstr and
	// the byte offset inside it. Flags holds the record's raw flag bits.
	Block  string
	Offset uint64
	Flags  uint64
	// Blocks is the RAM block list of a KindMemSize record.
	Blocks []Block
	// Value is the total RAM size of KindMemSize and the value of a PING.
	Value uint64
	// Machine is the machine name of a KindConfig record.
	Machine string
	// Command is the sub-type of a KindCommand record.
	Command Command
	// Data is the payload of KindDevice, KindHandshake (JSON), KindCommand and
	// KindVMDesc (JSON) records.
	Data []byte
	// Handshake is the decoded handshake of a KindHandshake record.
	Handshake *Handshake
}
