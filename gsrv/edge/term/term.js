// gsrv's terminal page (pty = true, console = true): xterm.js on the session's WebSocket, in
// gsrv's typed framing: to gsrv "i" input and "r" COLSxROWS resizes, from it "o" output and
// "e" stderr, each message's first byte its type. Output bytes go to xterm.js as they are:
// it decodes UTF-8 as a stream, so a character split across messages comes out whole.
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
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  const send = (type, text) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(type + text));
  };
  const resized = () => send("r", term.cols + "x" + term.rows);
  ws.onopen = () => {
    status.textContent = "connected: " + url;
    resized();
    term.focus();
  };
  // Flow control: the page acknowledges the output xterm.js has parsed ("a" + the byte count of
  // "o" messages so far), so gsrv keeps at most its reattach_buffer sent and not rendered, and
  // a flood (yes, seq) waits in the program instead of piling up here. gsrvPending: bytes given
  // to xterm.js and not parsed yet (and its highest, for tests and the curious).
  let received = 0, rendered = 0, reported = -1;
  window.gsrvPending = 0;
  window.gsrvPendingMost = 0;
  const ACK_EVERY = 16384;
  const acks = new URLSearchParams(location.search).get("acks") !== "0";  // ?acks=0: none (to compare)
  const acknowledge = () => {
    if (acks && (rendered - reported >= ACK_EVERY || rendered === received)) {
      reported = rendered;
      send("a", String(rendered));
    }
  };
  ws.onmessage = (event) => {
    const bytes = new Uint8Array(event.data);
    if (bytes.length < 2) return;
    const output = bytes[0] === 0x6f;  // "o"; "e" (stderr) is the screen's too, and not counted
    const data = bytes.subarray(1);
    if (!output) {
      term.write(data);
      return;
    }
    received += data.length;
    window.gsrvPending = received - rendered;
    window.gsrvPendingMost = Math.max(window.gsrvPendingMost, window.gsrvPending);
    term.write(data, () => {
      rendered += data.length;
      window.gsrvPending = received - rendered;
      acknowledge();
    });
  };
  ws.onclose = (event) => {
    const why = event.reason ? " (" + event.reason + ")" : "";
    status.textContent = "closed: code " + event.code + why;
    status.className = "closed";
    document.body.dataset.closeCode = String(event.code);
    document.body.dataset.closeReason = event.reason;
    term.write("\r\n\x1b[2m[closed: code " + event.code + why + "]\x1b[0m\r\n");
  };
  term.onData((data) => send("i", data));
  term.onBinary((data) => {  // bytes xterm.js sends as a binary string (some mouse reports)
    if (ws.readyState !== WebSocket.OPEN) return;
    const bytes = new Uint8Array(data.length + 1);
    bytes[0] = 0x69;  // "i"
    for (let i = 0; i < data.length; i++) bytes[i + 1] = data.charCodeAt(i) & 255;
    ws.send(bytes);
  });
  term.onResize(resized);
  window.addEventListener("resize", () => fit.fit());
})();
