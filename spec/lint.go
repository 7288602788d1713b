package spec

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// lint runs the checks that need more than one field: the graphs, the
// guard registry, parameter ranges and the rules' references to states and
// triggers. guards is the registry's list of names (nil: not checked).
func (l *loader) lint(s *Spec, guards []string) {
	if guards != nil {
		for i, g := range s.Guards {
			if g.Name != "" && !slices.Contains(guards, g.Name) {
				have := "none"
				if len(guards) > 0 {
					have = strings.Join(slices.Sorted(slices.Values(guards)), ", ")
				}
				l.at(fmt.Sprintf("guards[%d].name", i), "guard %q has no implementation in the guard registry (it has: %s)", g.Name, have)
			}
		}
	}
	for _, name := range SideNames {
		l.lintSide(name, s.Side(name), true)
	}
	if s.HasGuest() {
		l.lintSide(Guest, s.Guest, false)
	}
	for i := range s.Parameters {
		l.lintParameter(fmt.Sprintf("parameters[%d]", i), &s.Parameters[i])
	}
	l.lintRules(s)
	l.lintEffects(s)
}

// lintEffects checks each setting's declared effect: a refused one must be
// named by a declared rule's when (a rule refuses it), a vacuous one must
// say why.
func (l *loader) lintEffects(s *Spec) {
	namedCap, namedParam := map[string]bool{}, map[string]bool{}
	for _, r := range s.RuleList {
		for _, c := range append(slices.Clone(r.When.Caps), r.When.AnyCaps...) {
			namedCap[c] = true
		}
		for p := range r.When.Params {
			namedParam[p] = true
		}
	}
	check := func(path, kind, name, effect, why string, named bool) {
		switch effect {
		case EffectRefused:
			if !named {
				l.at(path+".effect", "%s %s is declared refused, but no rule's when names it; add it to the rule that refuses it (e.g. migctl/not-implemented) or change the effect", kind, name)
			}
		case EffectVacuous:
			if strings.TrimSpace(why) == "" {
				l.atKey(path+".effect", "%s %s is declared vacuous without a why: say what the guest lacks that it would apply to", kind, name)
			}
		}
	}
	for i, c := range s.Capabilities {
		check(fmt.Sprintf("capabilities[%d]", i), "capability", c.Name, c.Effect, c.Why, namedCap[c.Name])
	}
	for i, p := range s.Parameters {
		check(fmt.Sprintf("parameters[%d]", i), "parameter", p.Name, p.Effect, p.Why, namedParam[p.Name])
	}
}

// isPermit reports whether t moves the machine (kind permit, the default).
func (t *Transition) isPermit() bool { return t.Kind == "" || t.Kind == KindPermit }

// lintSide checks one graph. A migration side (migration true) needs a
// configuration on every state, terminal states, and a path to one from
// every state; the guest graph has neither configuration nor an end.
func (l *loader) lintSide(name string, sd *Side, migration bool) {
	for i, st := range sd.States {
		p := fmt.Sprintf("%s.states[%d]", name, i)
		switch {
		case migration && st.Config == "":
			l.atKey(p+".name", "%s.config is required: mutable or frozen", p)
		case !migration && st.Config != "":
			l.at(p+".config", "the guest graph's states have no configuration of their own; drop config:")
		case !migration && st.Terminal:
			l.at(p+".terminal", "the guest graph has no terminal state (a guest lives on); drop terminal:")
		case !migration && st.Report != "":
			l.at(p+".report", "report: is what query-migrate shows of a migration state; the guest graph has none")
		}
	}
	if !migration && len(sd.Configure) > 0 {
		l.atKey(name+".configure", "the guest graph takes no configuration changes; drop configure:")
	}
	for i, t := range sd.Transitions {
		if slices.Contains(ConfigTriggers, t.On) {
			l.at(fmt.Sprintf("%s.transitions[%d].on", name, i), "trigger %q is reserved for configuration changes (set-capabilities, set-parameters); name the edge's trigger otherwise", t.On)
		}
	}
	stateNames := names(sd.States, func(st State) string { return st.Name })
	stateSet := setOf(stateNames)
	isState := func(n string) bool { return stateSet[n] }
	notDeclared := func(path, role, st string) {
		l.at(path, "%s state %q is not declared in %s.states%s", role, st, name, didYouMean(st, stateNames))
	}
	if sd.Initial != "" && !isState(sd.Initial) {
		notDeclared(name+".initial", "initial", sd.Initial)
	}
	first := map[[2]string]int{} // (from, on) → first edge
	for i := range sd.Transitions {
		t := &sd.Transitions[i]
		p := fmt.Sprintf("%s.transitions[%d]", name, i)
		if t.From != "" && !isState(t.From) {
			notDeclared(p+".from", "from", t.From)
		}
		if t.To != "" && !isState(t.To) {
			notDeclared(p+".to", "to", t.To)
		}
		if t.Else != "" && !isState(t.Else) {
			notDeclared(p+".else", "else", t.Else)
		}
		if t.isPermit() && t.To != "" && t.To == t.From {
			l.at(p+".to", "edge %s --%s--> %s returns to its own state; stateless cannot permit a self-transition (use kind: ignore to accept the trigger and stay)", t.From, t.On, t.To)
		}
		if t.Else != "" && t.Else == t.From {
			l.at(p+".else", "else: %s is the edge's own state; a refused trigger already stays there, so drop else:", t.Else)
		}
		if t.From == "" || t.On == "" {
			continue
		}
		k := [2]string{t.From, t.On}
		if j, dup := first[k]; dup {
			l.at(p+".on", "a second edge for trigger %q in state %q (the first is at line %d); only one edge per state and trigger is allowed: write the guarded alternative as else: on one edge",
				t.On, t.From, l.ix.line(fmt.Sprintf("%s.transitions[%d]", name, j)))
			continue
		}
		first[k] = i
	}
	if !isState(sd.Initial) {
		return // reachability means nothing without a start
	}
	next := map[string][]string{}
	for _, t := range sd.Transitions {
		if !t.isPermit() {
			continue
		}
		if t.To != "" {
			next[t.From] = append(next[t.From], t.To)
		}
		if t.Else != "" {
			next[t.From] = append(next[t.From], t.Else)
		}
	}
	reached := closure([]string{sd.Initial}, next)
	for i, st := range sd.States {
		if st.Name != "" && !reached[st.Name] {
			l.at(fmt.Sprintf("%s.states[%d].name", name, i), "state %q cannot be reached from the initial state %q", st.Name, sd.Initial)
		}
	}
	if !migration {
		return
	}
	var terminals []string
	for _, st := range sd.States {
		if st.Terminal {
			terminals = append(terminals, st.Name)
		}
	}
	if len(terminals) == 0 {
		l.atKey(name+".states", "%s has no terminal state; mark the states where a migration ends with terminal: true", name)
		return
	}
	prev := map[string][]string{}
	for from, tos := range next {
		for _, to := range tos {
			prev[to] = append(prev[to], from)
		}
	}
	ends := closure(terminals, prev)
	for i, st := range sd.States {
		if st.Name != "" && reached[st.Name] && !ends[st.Name] {
			l.at(fmt.Sprintf("%s.states[%d].name", name, i), "state %q has no path to a terminal state (%s); a migration could be stuck there", st.Name, strings.Join(terminals, ", "))
		}
	}
}

// closure returns every node reachable from start along edges.
func closure(start []string, edges map[string][]string) map[string]bool {
	seen := map[string]bool{}
	stack := slices.Clone(start)
	for len(stack) > 0 {
		n := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[n] {
			continue
		}
		seen[n] = true
		stack = append(stack, edges[n]...)
	}
	return seen
}

// zeroValue is a value of the parameter's type, to try its tag on.
func (p *Parameter) zeroValue() any {
	switch p.Type {
	case TypeBool:
		return false
	case TypeUint8, TypeUint32, TypeUint64, TypeSize:
		return uint64(0)
	}
	return ""
}

// compileTag reports whether tag can be run on v at all (the validator
// panics on unknown tags and on tags that do not fit the value's kind).
func compileTag(v any, tag string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	_ = valueValidator.Var(v, tag)
	return nil
}

var knownTypes = []string{TypeBool, TypeUint8, TypeUint32, TypeUint64, TypeSize, TypeString, TypeEnum}

func (l *loader) lintParameter(path string, p *Parameter) {
	if !slices.Contains(knownTypes, p.Type) {
		return // the validator reported the type
	}
	if p.Validate != "" {
		if err := compileTag(p.zeroValue(), p.Validate); err != nil {
			l.at(path+".validate", "validate tag %q of parameter %s does not compile for a %s: %v", p.Validate, p.Name, p.Type, err)
			return
		}
	}
	if p.Type == TypeEnum && len(p.Values) == 0 {
		return // the validator reported the missing values
	}
	if _, err := p.Normalize(p.Default); err != nil {
		where := path + ".default"
		what := fmt.Sprintf("default %q", p.Default)
		if l.ix.line(where) == 0 {
			what = "the missing default (\"\")"
		}
		l.at(where, "%s of parameter %s is not a valid value: %s", what, p.Name, valueProblem(p, err))
	}
}

// valueProblem strips Normalize's wrapping down to the problem itself.
func valueProblem(p *Parameter, err error) string {
	return strings.TrimPrefix(err.Error(), ErrBadValue.Error()+": parameter "+p.Name+": ")
}

// sideNames is what lintCond needs to know of a side.
type sideNames struct {
	states, triggers     []string
	stateSet, triggerSet map[string]bool
}

func (l *loader) lintRules(s *Spec) {
	sides := map[string]*sideNames{}
	all := &sideNames{}
	for _, n := range SideNames {
		sd := s.Side(n)
		sn := &sideNames{states: names(sd.States, func(st State) string { return st.Name }), triggers: append(sd.Triggers(), ConfigTriggers...)}
		sn.stateSet, sn.triggerSet = setOf(sn.states), setOf(sn.triggers)
		sides[n] = sn
		all.states = append(all.states, sn.states...)
		all.triggers = append(all.triggers, sn.triggers...)
	}
	all.stateSet, all.triggerSet = setOf(all.states), setOf(all.triggers)
	guest := &sideNames{}
	if s.HasGuest() {
		guest.states = names(s.Guest.States, func(st State) string { return st.Name })
	}
	guest.stateSet = setOf(guest.states)
	sides[Guest] = guest
	params := map[string]*Parameter{}
	for i := range s.Parameters {
		params[s.Parameters[i].Name] = &s.Parameters[i]
	}
	sides[""] = all
	l.params = params
	shorthand := map[string]string{}
	for _, r := range s.expandShorthands() {
		shorthand[r.Name] = r.Doc
	}
	for i := range s.RuleList {
		r := &s.RuleList[i]
		p := fmt.Sprintf("rules[%d]", i)
		if doc, taken := shorthand[r.Name]; taken {
			l.at(p+".name", "rule name %q is taken by a shorthand (%s); choose another name", r.Name, doc)
		}
		l.lintCond(s, sides, p+".when", &r.When)
		if r.Require != nil {
			l.lintCond(s, sides, p+".require", r.Require)
		}
	}
}

// lintCond checks what a condition names that the validator cannot: states
// and triggers of the side it is about, and parameter values of the right
// type.
func (l *loader) lintCond(s *Spec, sides map[string]*sideNames, path string, c *Cond) {
	where := "incoming or outgoing"
	sn := sides[""]
	if c.Side == Incoming || c.Side == Outgoing {
		where, sn = c.Side, sides[c.Side]
	}
	for j, st := range c.States {
		if st != "" && !sn.stateSet[st] {
			l.at(fmt.Sprintf("%s.states[%d]", path, j), "state %q is not declared in %s%s", st, where, didYouMean(st, sn.states))
		}
	}
	for j, tr := range c.Triggers {
		if tr != "" && !sn.triggerSet[tr] {
			l.at(fmt.Sprintf("%s.triggers[%d]", path, j), "trigger %q is on no edge of %s and is not a configuration trigger%s", tr, where, didYouMean(tr, sn.triggers))
		}
	}
	gs := sides[Guest]
	for j, st := range c.GuestStates {
		switch {
		case st == "":
		case len(gs.states) == 0:
			l.at(fmt.Sprintf("%s.guest-states[%d]", path, j), "guest-states needs the guest graph (guest:), which this spec does not declare")
		case !gs.stateSet[st]:
			l.at(fmt.Sprintf("%s.guest-states[%d]", path, j), "state %q is not declared in guest%s", st, didYouMean(st, gs.states))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(c.Params)) {
		pc := c.Params[name]
		p := l.params[name]
		if p == nil || !slices.Contains(knownTypes, p.Type) {
			continue // the validator reported it
		}
		pp := path + ".params." + name
		check := func(at, v string) {
			if _, err := p.Normalize(v); err != nil {
				l.at(at, "%q is not a value of parameter %s: %s", v, name, valueProblem(p, err))
			}
		}
		if pc.Eq != nil {
			check(pp+".eq", *pc.Eq)
		}
		if pc.Ne != nil {
			check(pp+".ne", *pc.Ne)
		}
		for j, v := range pc.In {
			check(fmt.Sprintf("%s.in[%d]", pp, j), v)
		}
		for key, other := range map[string]string{"ge-param": pc.GeParam, "le-param": pc.LeParam} {
			if other == "" {
				continue
			}
			q := l.params[other]
			if q == nil {
				continue
			}
			if !p.numeric() || !q.numeric() {
				l.at(pp+"."+key, "%s compares numbers, but %s is %s and %s is %s", key, name, p.Type, other, q.Type)
			}
		}
	}
}

// numeric reports whether the parameter holds an unsigned integer.
func (p *Parameter) numeric() bool {
	switch p.Type {
	case TypeUint8, TypeUint32, TypeUint64, TypeSize:
		return true
	}
	return false
}
