// A QMP client built on Debian's golang-github-digitalocean-go-qemu-dev
// (package qmp): a third-party QMP implementation driving stratad's control
// socket.  Usage: qmp-go SOCKET IMAGE.  Prints one line per step; exits 1
// on the first unexpected answer.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

func must(err error, what string) {
	if err != nil {
		fmt.Printf("FAIL: %s: %v\n", what, err)
		os.Exit(1)
	}
}

func run(mon *qmp.SocketMonitor, cmd string, args map[string]interface{}) (json.RawMessage, error) {
	c := map[string]interface{}{"execute": cmd}
	if args != nil {
		c["arguments"] = args
	}
	b, _ := json.Marshal(c)
	raw, err := mon.Run(b)
	if err != nil {
		return nil, err
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, err
	}
	return r.Return, nil
}

func main() {
	sock, image := os.Args[1], os.Args[2]
	mon, err := qmp.NewSocketMonitor("unix", sock, 5*time.Second)
	must(err, "connect")
	must(mon.Connect(), "greeting and qmp_capabilities")
	defer mon.Disconnect()
	fmt.Printf("ok: connected; greeting version %d.%d.%d %q\n", mon.Version.QEMU.Major,
		mon.Version.QEMU.Minor, mon.Version.QEMU.Micro, mon.Version.Package)
	events, err := mon.Events(context.Background())
	must(err, "events")

	r, err := run(mon, "query-version", nil)
	must(err, "query-version")
	if !strings.Contains(string(r), "strata") {
		fmt.Printf("FAIL: query-version: %s\n", r)
		os.Exit(1)
	}
	fmt.Printf("ok: query-version %s\n", r)

	_, err = run(mon, "blockdev-add", map[string]interface{}{
		"driver": "raw", "node-name": "gonode",
		"file": map[string]interface{}{"driver": "file", "filename": image}})
	must(err, "blockdev-add")
	_, err = run(mon, "block-export-add", map[string]interface{}{
		"type": "nbd", "id": "goexp", "node-name": "gonode", "writable": true})
	must(err, "block-export-add")
	r, err = run(mon, "query-block-exports", nil)
	must(err, "query-block-exports")
	var exps []struct {
		ID       string `json:"id"`
		NodeName string `json:"node-name"`
		Type     string `json:"type"`
	}
	must(json.Unmarshal(r, &exps), "decode exports")
	found := false
	for _, e := range exps {
		if e.ID == "goexp" && e.NodeName == "gonode" && e.Type == "nbd" {
			found = true
		}
	}
	if !found {
		fmt.Printf("FAIL: goexp not in %s\n", r)
		os.Exit(1)
	}
	fmt.Println("ok: blockdev-add, block-export-add, query-block-exports")

	_, err = run(mon, "no-such-command", nil)
	if err == nil || !strings.Contains(err.Error(), "has not been found") {
		fmt.Printf("FAIL: unknown command: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("ok: unknown command refused: %v\n", err)

	_, err = run(mon, "block-export-del", map[string]interface{}{"id": "goexp"})
	must(err, "block-export-del")
	select {
	case ev := <-events:
		if ev.Event != "BLOCK_EXPORT_DELETED" || ev.Data["id"] != "goexp" || ev.Timestamp.Seconds == 0 {
			fmt.Printf("FAIL: event %+v\n", ev)
			os.Exit(1)
		}
		fmt.Printf("ok: event %s %v at %d.%06d\n", ev.Event, ev.Data, ev.Timestamp.Seconds,
			ev.Timestamp.Microseconds)
	case <-time.After(10 * time.Second):
		fmt.Println("FAIL: no BLOCK_EXPORT_DELETED event")
		os.Exit(1)
	}
	_, err = run(mon, "blockdev-del", map[string]interface{}{"node-name": "gonode"})
	must(err, "blockdev-del")
	fmt.Println("PASS")
}
