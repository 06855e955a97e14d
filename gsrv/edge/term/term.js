// gsrv's terminal page (pty = true, console = true): xterm.js on the session's WebSocket, in
// gsrv's typed framing: to gsrv "i" input and "r" COLSxROWS resizes, from it "o" output and
// "e" stderr, each message's first byte its type. Output bytes go to xterm.js as they are:
// it decodes UTF-8 as a stream, so a character split across messages comes out whole.
//
// It speaks gsrv's terminal protocol (the WebSocket subprotocol "gsrv-term", README's
// "Terminal in the browser"): its first message, the hello ("h" + JSON), may carry a bearer
// token (from the fragment: #bearer=TOKEN) and, reconnecting, the session's token and the
// output offset the page has; gsrv's answer gives the offset its output continues from and,
// with reattach, the session's token, which the page keeps in its fragment (#session=TOKEN:
// never sent to a server), so a dropped connection, and a reload, reattach. With share, the
// answer has a watch token too: the page shows a link (#watch=TOKEN) that opens a watcher.
"use strict";
(() => {
  const status = document.getElementById("status");
  const term = new Terminal({cursorBlink: true, scrollback: 5000, convertEol: false});
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("term"));
  fit.fit();
  window.gsrvTerm = term;  // for tests and the curious: the buffer, the size
  const base = location.pathname.replace(/\/+$/, "") || "/";
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base + location.search;
  const acks = new URLSearchParams(location.search).get("acks") !== "0";  // ?acks=0: none (to compare)
  const fragment = new URLSearchParams(location.hash.slice(1));
  let bearer = fragment.get("bearer");
  let session = fragment.get("session");  // the session's token, once gsrv gave one (reattach)
  const watch = fragment.get("watch");  // a watcher's page: the session's watch token (share)
  let shared = "";  // the driver's: the link a watcher opens
  const encoder = new TextEncoder(), decoder = new TextDecoder();
  let ws = null, retry = 250;
  window.gsrvConnects = 0;
  const send = (type, text) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(type + text));
  };
  const resized = () => send("r", term.cols + "x" + term.rows);
  // Flow control: the page acknowledges the output xterm.js has parsed ("a" + the byte count of
  // "o" messages so far), so gsrv keeps at most its reattach_buffer sent and not rendered, and
  // a flood (yes, seq) waits in the program instead of piling up here. received: the output
  // offset given to xterm.js (a reattach asks for what follows it); gsrvPending: bytes given to
  // xterm.js and not parsed yet (and its highest, for tests and the curious).
  let received = 0, rendered = 0, reported = -1;
  window.gsrvPending = 0;
  window.gsrvPendingMost = 0;
  const ACK_EVERY = 16384;
  const acknowledge = () => {
    if (acks && (rendered - reported >= ACK_EVERY || rendered === received)) {
      reported = rendered;
      send("a", String(rendered));
    }
  };
  const remember = () => {  // the fragment: what a reload needs, never sent to a server
    const kept = new URLSearchParams();
    if (bearer) kept.set("bearer", bearer);
    if (session) kept.set("session", session);
    if (watch) kept.set("watch", watch);
    history.replaceState(null, "", location.pathname + location.search + (kept.toString() ? "#" + kept : ""));
  };
  const hello = (fields) => {  // gsrv's answer: where its output continues, the session's token
    if (fields.token) session = fields.token;
    remember();
    if (fields.watch) {
      shared = location.origin + location.pathname + location.search + "#watch=" + fields.watch;
      window.gsrvShare = shared;
    }
    if (watch) {  // a watcher starts from the kept output, on a clean screen (each time it connects)
      term.reset();
      received = rendered = fields.offset;
      reported = -1;
    }
    const skipped = fields.offset - received;  // output gsrv no longer had (a reload): not counted twice
    if (skipped > 0) {
      received += skipped;
      rendered += skipped;
    }
    window.gsrvReceived = received;
  };
  const output = (data) => {
    received += data.length;
    window.gsrvReceived = received;
    window.gsrvPending = received - rendered;
    window.gsrvPendingMost = Math.max(window.gsrvPendingMost, window.gsrvPending);
    term.write(data, () => {
      rendered += data.length;
      window.gsrvPending = received - rendered;
      acknowledge();
    });
  };
  const connect = () => {
    ws = new WebSocket(url, acks ? ["gsrv-term"] : []);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      window.gsrvConnects += 1;
      retry = 250;
      if (ws.protocol === "gsrv-term") {
        const fields = {};
        if (bearer) fields.bearer = bearer;
        if (watch) fields.watch = watch;
        else if (session) Object.assign(fields, {resume: session, offset: received});
        send("h", JSON.stringify(fields));
      }
      status.textContent = "connected: " + url;
      status.className = "";
      resized();
      term.focus();
    };
    ws.onmessage = (event) => {
      const bytes = new Uint8Array(event.data);
      if (bytes.length < 1) return;
      const data = bytes.subarray(1);
      if (bytes[0] === 0x68) {  // "h"
        const fields = JSON.parse(decoder.decode(data));
        hello(fields);
        status.textContent = (watch ? "watching (" + fields.share + "): " : "connected: ") + url;
        if (shared) {  // for the driver: the link a watcher opens
          const link = document.createElement("a");
          link.href = shared;
          link.textContent = "watch link";
          link.target = "_blank";
          status.append(" \u00b7 share: ", link);
        }
      }
      else if (bytes[0] === 0x6f) output(data);  // "o"
      else term.write(data);  // "e" (stderr) is the screen's too, and not counted
    };
    ws.onclose = (event) => {
      const why = event.reason ? " (" + event.reason + ")" : "";
      if (event.code === 1006 && (session || watch)) {  // dropped without a close: the session waits for us
        status.textContent = "reconnecting in " + retry / 1000 + "s (code 1006)";
        status.className = "closed";
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 8000);
        return;
      }
      if (event.code === 4404 && session) {  // gone: a reload starts afresh
        session = null;
        remember();
      }
      if (event.code === 4401 && !bearer) {  // auth = { bearer = FILE }: ask once
        bearer = window.prompt("This terminal needs a token (auth = bearer)") || null;
        if (bearer) {
          remember();
          connect();
          return;
        }
      }
      status.textContent = "closed: code " + event.code + why;
      status.className = "closed";
      document.body.dataset.closeCode = String(event.code);
      document.body.dataset.closeReason = event.reason;
      term.write("\r\n\x1b[2m[closed: code " + event.code + why + "]\x1b[0m\r\n");
    };
  };
  connect();
  term.onData((data) => send("i", data));
  term.onBinary((data) => {  // bytes xterm.js sends as a binary string (some mouse reports)
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const bytes = new Uint8Array(data.length + 1);
    bytes[0] = 0x69;  // "i"
    for (let i = 0; i < data.length; i++) bytes[i + 1] = data.charCodeAt(i) & 255;
    ws.send(bytes);
  });
  term.onResize(resized);
  window.addEventListener("resize", () => fit.fit());
})();
