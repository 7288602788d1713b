package spec

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/go-playground/validator/v10"
)

// identRe is a lower-case kebab-case name: postcopy-ram, tcp, x-colo.
var identRe = regexp.MustCompile(`^[a-z][a-z0-9]*(-[a-z0-9]+)*$`)

// ruleNameRe is one or more identifiers joined by '/': mapped-ram/no-tls.
var ruleNameRe = regexp.MustCompile(`^[a-z][a-z0-9]*(-[a-z0-9]+)*(/[a-z][a-z0-9]*(-[a-z0-9]+)*)*$`)

// specValidator checks the struct tags of the spec types. It is built once;
// validator.Validate is safe for concurrent use after registration.
var specValidator = newSpecValidator()

func newSpecValidator() *validator.Validate {
	v := validator.New(validator.WithRequiredStructEnabled())
	v.RegisterTagNameFunc(func(f reflect.StructField) string {
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			return ""
		}
		return name
	})
	must := func(err error) {
		if err != nil {
			panic(err) // a programming error in this file, caught by every test
		}
	}
	str := func(re *regexp.Regexp) validator.Func {
		return func(fl validator.FieldLevel) bool {
			return fl.Field().Kind() == reflect.String && re.MatchString(fl.Field().String())
		}
	}
	must(v.RegisterValidation("ident", str(identRe)))
	must(v.RegisterValidation("statename", str(identRe)))
	must(v.RegisterValidation("rulename", str(ruleNameRe)))
	for _, kind := range crossRefKinds {
		must(v.RegisterValidationCtx(kind, declared(kind)))
	}
	v.RegisterStructValidation(capabilityLevel, Capability{})
	v.RegisterStructValidation(parameterLevel, Parameter{})
	v.RegisterStructValidation(transitionLevel, Transition{})
	v.RegisterStructValidation(condLevel, Cond{})
	v.RegisterStructValidation(paramCondLevel, ParamCond{})
	return v
}

func names[T any](list []T, name func(T) string) []string {
	out := make([]string, len(list))
	for i, x := range list {
		out[i] = name(x)
	}
	return out
}

// crossRefKinds are the validator tags that check a name is declared in the
// spec under validation.
var crossRefKinds = []string{"capability", "parameter", "transport", "feature", "guard"}

// nameSets holds the names a spec declares, by kind, in declaration order
// and as sets.
type nameSets struct {
	list map[string][]string
	set  map[string]map[string]bool
}

func newNameSets(s *Spec) *nameSets {
	ns := &nameSets{
		list: map[string][]string{
			"capability": names(s.Capabilities, func(c Capability) string { return c.Name }),
			"parameter":  names(s.Parameters, func(p Parameter) string { return p.Name }),
			"transport":  names(s.Transports, func(t Transport) string { return t.Name }),
			"feature":    names(s.Features, func(f Feature) string { return f.Name }),
			"guard":      names(s.Guards, func(g Guard) string { return g.Name }),
		},
		set: map[string]map[string]bool{},
	}
	for kind, l := range ns.list {
		ns.set[kind] = setOf(l)
	}
	return ns
}

func setOf(xs []string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

type nameSetsKey struct{}

// declared builds the cross-reference check of one kind: the field names an
// entry of the spec under validation. Load passes the spec's names in the
// context; without them the check finds the Spec through fl.Top().
func declared(kind string) validator.FuncCtx {
	return func(ctx context.Context, fl validator.FieldLevel) bool {
		if fl.Field().Kind() != reflect.String {
			return true
		}
		ns, _ := ctx.Value(nameSetsKey{}).(*nameSets)
		if ns == nil {
			top := fl.Top()
			if top.Kind() != reflect.Pointer || top.IsNil() {
				return true
			}
			s, ok := top.Interface().(*Spec)
			if !ok {
				return true
			}
			ns = newNameSets(s)
		}
		return ns.set[kind][fl.Field().String()]
	}
}

func capabilityLevel(sl validator.StructLevel) {
	c := sl.Current().Interface().(Capability)
	for i, o := range c.Conflicts {
		if o == c.Name {
			sl.ReportError(o, fmt.Sprintf("conflicts[%d]", i), "Conflicts", "self", "conflicts")
		}
	}
	for i, o := range c.Requires {
		if o == c.Name {
			sl.ReportError(o, fmt.Sprintf("requires[%d]", i), "Requires", "self", "requires")
		} else if slices.Contains(c.Conflicts, o) {
			sl.ReportError(o, fmt.Sprintf("requires[%d]", i), "Requires", "requires-conflict", "")
		}
	}
}

func parameterLevel(sl validator.StructLevel) {
	p := sl.Current().Interface().(Parameter)
	if p.Type != TypeEnum && len(p.Values) > 0 {
		sl.ReportError(p.Values, "values", "Values", "values-not-enum", p.Type)
	}
}

func transitionLevel(sl validator.StructLevel) {
	t := sl.Current().Interface().(Transition)
	if t.Kind != KindRefuse && t.Message != "" {
		sl.ReportError(t.Message, "message", "Message", "message-not-refuse", "")
	}
	switch t.Kind {
	case KindIgnore, KindRefuse:
		if t.To != "" {
			sl.ReportError(t.To, "to", "To", "stay-to", t.Kind)
		}
		if t.Else != "" {
			sl.ReportError(t.Else, "else", "Else", "stay-else", t.Kind)
		}
		// An ignore edge may be guarded (ignored when its guards allow,
		// refused with their reasons otherwise); a refuse edge may not.
		if len(t.Guards) > 0 && t.Kind == KindRefuse {
			sl.ReportError(t.Guards, "guards", "Guards", "stay-guards", t.Kind)
		}
		if t.Kind == KindRefuse && t.Message == "" {
			sl.ReportError(t.Message, "message", "Message", "refuse-message", "")
		}
	default:
		if t.To == "" {
			sl.ReportError(t.To, "to", "To", "required_unless", "")
		}
	}
}

func condLevel(sl validator.StructLevel) {
	c := sl.Current().Interface().(Cond)
	for i, n := range c.CapsOff {
		if slices.Contains(c.Caps, n) || slices.Contains(c.Enabling, n) {
			sl.ReportError(n, fmt.Sprintf("caps-off[%d]", i), "CapsOff", "never-holds", "")
		}
	}
	for i, n := range c.NotTransports {
		if slices.Contains(c.Transports, n) {
			sl.ReportError(n, fmt.Sprintf("not-transports[%d]", i), "NotTransports", "never-holds", "")
		}
	}
	for i, n := range c.TransportLacks {
		if slices.Contains(c.TransportHas, n) {
			sl.ReportError(n, fmt.Sprintf("transport-lacks[%d]", i), "TransportLacks", "never-holds", "")
		}
	}
}

func paramCondLevel(sl validator.StructLevel) {
	pc := sl.Current().Interface().(ParamCond)
	if pc.Eq == nil && pc.Ne == nil && len(pc.In) == 0 && pc.GeParam == "" && pc.LeParam == "" {
		sl.ReportError(pc, "", "", "empty-param-cond", "")
	}
}

// validate runs the struct tags and the struct-level checks and reports
// each failure at its YAML position.
func (l *loader) validate(s *Spec) {
	l.spec = s
	l.names = newNameSets(s)
	err := specValidator.StructCtx(context.WithValue(context.Background(), nameSetsKey{}, l.names), s)
	var ves validator.ValidationErrors
	if !errors.As(err, &ves) {
		if err != nil {
			l.errorf(1, 1, "validating: %v", err)
		}
		return
	}
	for _, fe := range ves {
		l.fieldError(fe)
	}
}

// fieldPath turns a validator namespace ("Spec.rules[0].when.params[mode].eq")
// into an index path ("rules[0].when.params.mode.eq"). onKey reports that
// the namespace ends in a map key (the error is about the key itself).
func fieldPath(ns string) (path string, onKey bool) {
	_, ns, _ = strings.Cut(ns, ".") // the root type name
	var b strings.Builder
	for i := 0; i < len(ns); {
		if ns[i] != '[' {
			b.WriteByte(ns[i])
			i++
			continue
		}
		j := strings.IndexByte(ns[i:], ']')
		if j < 0 {
			b.WriteString(ns[i:])
			break
		}
		inner := ns[i+1 : i+j]
		if isDigits(inner) {
			b.WriteString(ns[i : i+j+1])
		} else {
			b.WriteByte('.')
			b.WriteString(inner)
			onKey = i+j+1 == len(ns)
		}
		i += j + 1
	}
	return strings.TrimSuffix(b.String(), "."), onKey
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// fieldError reports one validator failure with a message a spec author can
// act on.
func (l *loader) fieldError(fe validator.FieldError) {
	path, onKey := fieldPath(fe.Namespace())
	report := l.at
	if onKey {
		report = l.atKey
	}
	val := fe.Value()
	switch fe.Tag() {
	case "required":
		if l.ix.line(path) != 0 {
			report(path, "%s must not be empty", path)
		} else {
			report(path, "%s is required", path)
		}
	case "required_if":
		report(path, "%s is required when %s", path, strings.ReplaceAll(strings.ToLower(fe.Param()), " ", " is "))
	case "required_unless":
		report(path, "%s is required (only kind: ignore and kind: refuse edges have no target)", path)
	case "excluded_without":
		switch fe.Field() {
		case "else":
			report(path, "%s needs guards: the else target is taken only when a guard refuses", path)
		default:
			report(path, "%s is set without %s", path, kebab(fe.Param()))
		}
	case "min":
		report(path, "%s must have at least %s entr%s", path, fe.Param(), plural(fe.Param(), "y", "ies"))
	case "eq":
		report(path, "%s must be %s, got %v", path, fe.Param(), val)
	case "oneof":
		report(path, "%s must be one of %s, got %q", path, strings.ReplaceAll(fe.Param(), " ", ", "), fmt.Sprint(val))
	case "unique":
		l.duplicate(path, fe)
	case "ident", "statename":
		what := "name"
		if fe.Tag() == "statename" {
			what = "state name"
		}
		report(path, "%s: %q is not a valid %s; use lower-case letters, digits and single dashes, like \"postcopy-ram\"", path, fmt.Sprint(val), what)
	case "rulename":
		report(path, "%s: %q is not a valid rule name; use lower-case kebab-case names joined by '/', like \"mapped-ram/no-tls\"", path, fmt.Sprint(val))
	case "capability", "parameter", "transport", "feature", "guard":
		l.undeclared(report, path, fe.Tag(), fmt.Sprint(val))
	case "self":
		report(path, "%s: capability %q lists itself in %s", path, fmt.Sprint(val), fe.Param())
	case "requires-conflict":
		report(path, "%s: capability %q is both required and in conflicts", path, fmt.Sprint(val))
	case "values-not-enum":
		report(path, "%s: values are only for enum parameters, and this one is %s", path, fe.Param())
	case "stay-to":
		report(path, "%s: a kind: %s edge stays in its state; drop to:", path, fe.Param())
	case "stay-else":
		report(path, "%s: a kind: %s edge has no refusal edge; drop else:", path, fe.Param())
	case "stay-guards":
		report(path, "%s: a kind: %s edge runs no guards; drop guards:", path, fe.Param())
	case "refuse-message":
		report(path, "%s is required: a kind: refuse edge answers with it", path)
	case "message-not-refuse":
		report(path, "%s: only a kind: refuse edge has a message", path)
	case "never-holds":
		report(path, "%s: %q is also required by this condition, so it can never hold", path, fmt.Sprint(val))
	case "empty-param-cond":
		report(path, "%s compares nothing; give eq, ne, in, ge-param or le-param", path)
	default:
		report(path, "%s fails the check %s", path, strings.TrimSuffix(fe.Tag()+"="+fe.Param(), "="))
	}
}

func plural(n, one, many string) string {
	if n == "1" {
		return one
	}
	return many
}

// kebab turns a Go field name (NeedsKernel) into its YAML spelling.
func kebab(goName string) string {
	var b strings.Builder
	for i, r := range goName {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				b.WriteByte('-')
			}
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// undeclared reports a cross-reference to a name the spec does not declare.
func (l *loader) undeclared(report func(string, string, ...any), path, kind, name string) {
	known := l.names.list[kind]
	section := kind + "s"
	if kind == "capability" {
		section = "capabilities"
	}
	report(path, "%s: %s %q is not declared under %s:%s", path, kind, name, section, didYouMean(name, known))
}

// duplicate reports a unique tag's failure at the second occurrence.
func (l *loader) duplicate(path string, fe validator.FieldError) {
	v := reflect.ValueOf(fe.Value())
	if v.Kind() != reflect.Slice {
		l.at(path, "%s must not contain duplicates", path)
		return
	}
	field := fe.Param() // the struct field compared, or "" for plain values
	seen := map[string]int{}
	for i := 0; i < v.Len(); i++ {
		e := v.Index(i)
		if field != "" && e.Kind() == reflect.Struct {
			e = e.FieldByName(field)
		}
		key := fmt.Sprint(e.Interface())
		first, dup := seen[key]
		if !dup {
			seen[key] = i
			continue
		}
		at := fmt.Sprintf("%s[%d]", path, i)
		firstLine := l.ix.line(fmt.Sprintf("%s[%d]", path, first))
		if field != "" {
			l.at(at+".name", "%s: a second entry named %q (the first is at line %d); names must be unique", path, key, firstLine)
		} else {
			l.at(at, "%s: %q is listed twice (the first at line %d)", path, key, firstLine)
		}
	}
}
