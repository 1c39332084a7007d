// The capstan console's script: the acting-agent selector, the buttons
// (forms posted with fetch, the answer shown without a reload) and live
// updates of the inbox (server-sent events). No framework, no build.
(function () {
  'use strict';
  var who = document.body.dataset.as || '';
  var sel = document.getElementById('as-select');
  if (sel) {
    sel.addEventListener('change', function () { sel.form.submit(); });
  }
  var status = document.getElementById('status');
  function show(text, ok) {
    if (!status) { return; }
    status.textContent = text;
    status.className = ok ? 'ok' : 'err';
  }
  var refreshing = false, again = false;
  function refresh() {
    var inbox = document.getElementById('inbox');
    if (!inbox) { return; }
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch('/inbox/frag?as=' + encodeURIComponent(who), { credentials: 'same-origin' })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var cur = document.getElementById('inbox');
        // keep what was picked in open forms
        var picked = {};
        cur.querySelectorAll('select').forEach(function (s) {
          var f = s.closest('form');
          if (f) { picked[f.dataset.key + '|' + s.name] = s.value; }
        });
        var t = document.createElement('template');
        t.innerHTML = html;
        var fresh = t.content.firstElementChild;
        fresh.querySelectorAll('select').forEach(function (s) {
          var f = s.closest('form');
          var v = f && picked[f.dataset.key + '|' + s.name];
          if (v) { s.value = v; }
        });
        cur.replaceWith(fresh);
      })
      .catch(function (e) { show('could not refresh the inbox: ' + e, false); })
      .then(function () {
        refreshing = false;
        if (again) { again = false; refresh(); }
      });
  }
  document.addEventListener('submit', function (ev) {
    var f = ev.target;
    if (!f.classList || !f.classList.contains('act')) { return; }
    ev.preventDefault();
    var buttons = f.querySelectorAll('button');
    buttons.forEach(function (b) { b.disabled = true; });
    show('working…', true);
    fetch(f.getAttribute('action'), {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'X-Capstan-Fetch': '1' },
      body: new URLSearchParams(new FormData(f))
    })
      .then(function (r) { return r.json(); })
      .then(function (j) {
        if (j.ok) { show(j.text, true); } else {
          show('error: ' + j.error, false);
          buttons.forEach(function (b) { b.disabled = false; });
        }
        refresh();
      })
      .catch(function (e) {
        show('error: ' + e, false);
        buttons.forEach(function (b) { b.disabled = false; });
      });
  });
  var inbox = document.getElementById('inbox');
  if (inbox && window.EventSource) {
    var es = new EventSource('/events?as=' + encodeURIComponent(who) +
      '&after=' + encodeURIComponent(inbox.dataset.next || '0'));
    es.addEventListener('mail', refresh);
    document.body.dataset.live = 'on';
  }
}());
