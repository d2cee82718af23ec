/*
 * Proof of work for the BlueHats newsletter forms (see app/proofofwork.py).
 *
 * Hook: a page includes this file (no inline script: the pages' CSP allows none) and marks
 * its form `data-proof-of-work`, optionally with the challenge URL as the attribute's value
 * (default: /v1/challenge next to the form's action):
 *
 *   <script src="/static/pow.js" defer></script>
 *   <form method="post" action="/v1/lists/bluehats/subscriptions" data-proof-of-work>
 *
 * On submit it fetches a challenge, finds a nonce such that SHA-256(challenge + ":" + nonce)
 * starts with `bits` zero bits, fills the hidden fields `pow_challenge` and `pow_nonce`
 * (created when missing) and submits the form. The page's CSP needs `script-src 'self'` and
 * `connect-src 'self'` (or the service's origin when the form is on another site, which
 * must then be in NEWSLETTER_ALLOWED_ORIGINS for CORS). Without JavaScript the form posts
 * without proof, which the service refuses only when proof_of_work_bits > 0.
 *
 * `BlueHatsPow.solve(challenge, bits)` is exposed for other clients (and the tests).
 */
(function (root) {
  "use strict";

  var encoder = new TextEncoder();

  function leadingZeroBits(bytes) {
    var count = 0;
    for (var i = 0; i < bytes.length; i++) {
      if (bytes[i] === 0) {
        count += 8;
        continue;
      }
      return count + Math.clz32(bytes[i]) - 24;
    }
    return count;
  }

  async function solve(challenge, bits) {
    var subtle = root.crypto.subtle;
    for (var counter = 0; ; counter++) {
      var nonce = counter.toString(16);
      var digest = await subtle.digest("SHA-256", encoder.encode(challenge + ":" + nonce));
      if (leadingZeroBits(new Uint8Array(digest)) >= bits) {
        return nonce;
      }
    }
  }

  function field(form, name) {
    var input = form.querySelector('input[name="' + name + '"]');
    if (!input) {
      input = form.ownerDocument.createElement("input");
      input.type = "hidden";
      input.name = name;
      form.appendChild(input);
    }
    return input;
  }

  function challengeUrl(form) {
    var given = form.getAttribute("data-proof-of-work");
    if (given) {
      return given;
    }
    return new URL("/v1/challenge", form.action).href;
  }

  async function prove(form) {
    var response = await fetch(challengeUrl(form), { headers: { Accept: "application/json" } });
    if (!response.ok) {
      throw new Error("challenge: HTTP " + response.status);
    }
    var issued = await response.json();
    field(form, "pow_challenge").value = issued.challenge;
    field(form, "pow_nonce").value = await solve(issued.challenge, issued.bits);
  }

  function attach(form) {
    var solving = false;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (solving) {
        return;
      }
      solving = true;
      form.setAttribute("aria-busy", "true");
      prove(form)
        .catch(function () {
          // Sent without proof: the service answers with a clear error if it wants one.
        })
        .then(function () {
          solving = false;
          form.removeAttribute("aria-busy");
          HTMLFormElement.prototype.submit.call(form);
        });
    });
  }

  root.BlueHatsPow = { solve: solve, leadingZeroBits: leadingZeroBits };
  if (typeof document !== "undefined") {
    var start = function () {
      document.querySelectorAll("form[data-proof-of-work]").forEach(attach);
    };
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", start);
    } else {
      start();
    }
  }
})(typeof window !== "undefined" ? window : globalThis);
