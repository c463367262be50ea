import ChatBridgeCore
@testable import ChatBridgeLLM
@testable import ChatBridgeStore
import Foundation
import NIOCore
import Testing

/// Replacements made for speed behave exactly like what they replaced.
@Suite struct HotPathTests {
    static let samples = [
        "", " ", "\n\t ", "plain", "  both sides \n", "\u{3000}全角空格\u{3000}", "\u{00A0}nbsp\u{00A0}", "\u{2028}line\u{2029}",
        "\u{85}next line\u{85}", "tab\tinside", " \u{301}combining after a space", "emoji 👨‍👩‍👧 ", "\r\n/reset all\r\n", "\u{200B}zero width\u{200B}",
    ]

    @Test(arguments: samples) func trimmingMatchesFoundation(_ text: String) {
        #expect(text.trimmed == text.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(text.trimmedOfSpaces == text.trimmingCharacters(in: .whitespaces))
        #expect(text.dropFirst(0).trimmed == text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    @Test(arguments: StoreKind.enabled) func aQuestionsContextIsReadInOneCall(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        let key = ConversationKey(rawValue: "dingtalk/bot/c1/u1")
        var preferences = ConversationPreferences()
        preferences.persona = "poet"
        try await store.apply(.preferences(preferences), to: key)
        for index in 0..<3 {
            try await store.apply(.appendExchange(question: Turn(role: .user, content: "q\(index)", createdAt: Date()),
                                                  answer: Turn(role: .assistant, content: "a\(index)", createdAt: Date())), to: key)
        }
        let calls = store.commitQueue?.statistics.operations
        let context = try await store.context(key, turns: 4)
        #expect(context.preferences == preferences)
        #expect(context.turns.map(\.content) == ["q1", "a1", "q2", "a2"])
        #expect(context.turns == (try await store.recentTurns(key, limit: 4)))
        if let calls {
            // One trip through the commit queue for both (the check above made the second).
            #expect(store.commitQueue?.statistics.operations == calls + 2)
        }
        await store.close()
    }
}

@Suite struct PreparedStatementTests {
    @Test func keptStatementsAreNotParsedAgainOnEveryCall() async throws {
        let store = try await StoreKind.sqlite.open()
        let key = ConversationKey(rawValue: "dingtalk/bot/c1/u1")
        // The migrations changed the schema, which re-prepares the statements they ran; from here on, none.
        let before = try await store.commitQueue?.reprepares()
        for index in 0..<10 {
            _ = try await store.accept(inboxMessage("m\(index)", user: "u\(index)"), conversation: ConversationKey(rawValue: "k\(index)"), now: Date())
        }
        let accepts = try await store.commitQueue?.reprepares()
        for index in 0..<10 {
            _ = try await store.claim(limit: index + 1, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        }
        let claims = try await store.commitQueue?.reprepares()
        // A conversation with turns, read again and again: its plan looked at the bound key.
        try await store.apply(.appendExchange(question: Turn(role: .user, content: "q", createdAt: Date()),
                                              answer: Turn(role: .assistant, content: "a", createdAt: Date())), to: key)
        let other = ConversationKey(rawValue: "dingtalk/bot/c1/u2")
        try await store.apply(.appendExchange(question: Turn(role: .user, content: "q", createdAt: Date()),
                                              answer: Turn(role: .assistant, content: "a", createdAt: Date())), to: other)
        let appended = try await store.commitQueue?.reprepares()
        for index in 0..<10 {
            #expect(try await store.context(index.isMultiple(of: 2) ? key : other, turns: 20).turns.count == 2)
        }
        #expect(try await store.commitQueue?.reprepares() == appended, "the context read was parsed again")
        #expect(accepts == before)
        #expect(claims == before)
        let after = try await store.commitQueue?.reprepares()
        #expect(after == before, "parsed again: \(String(describing: before)) -> \(String(describing: after))")
        await store.close()
    }
}

extension PreparedStatementTests {
    @Test(arguments: StoreKind.enabled) func aClaimTakesExactlyItsLimitWhenEnoughIsWaiting(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        for index in 0..<12 {
            _ = try await store.accept(inboxMessage("m\(index)", user: "u\(index)"), conversation: ConversationKey(rawValue: "k\(index)"), now: Date())
        }
        // 7 runs as 4 + 2 + 1 on SQLite; then only 5 are left for a limit of 6.
        let first = try await store.claim(limit: 7, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(first.map(\.lease.id) == Array(1...7))
        let second = try await store.claim(limit: 6, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date())
        #expect(second.map(\.lease.id) == Array(8...12))
        await store.close()
    }
}

extension PreparedStatementTests {
    @Test(arguments: StoreKind.enabled) func aNewReplyIsStoredInTheWriteThatBeginsItsFirstSend(_ kind: StoreKind) async throws {
        let store = try await kind.open()
        _ = try await store.accept(inboxMessage("m1"), conversation: ConversationKey(rawValue: "k1"), now: Date())
        let now = Date()
        let claimed = try await store.claim(limit: 1, owner: "w", leaseUntil: now.addingTimeInterval(30), maxAttempts: 5, now: now)
        guard case .ready(let item) = try #require(claimed.first) else { Issue.record("unreadable"); return }
        let reply = StoredReply(text: "the answer", kind: .answer, effect: .none)
        // A stale token changes nothing.
        await #expect(throws: LeaseLost.self) {
            try await store.storeReply(reply, for: Lease(id: item.lease.id, token: "stale"), error: nil,
                                       beginningSendUntil: now.addingTimeInterval(60), uncertainSends: 1, now: now)
        }
        #expect(try await store.inboxRows().first?.answer == nil)
        try await store.storeReply(reply, for: item.lease, error: "the model refused", beginningSendUntil: now.addingTimeInterval(60), uncertainSends: 1, now: now)
        let row = try #require(try await store.inboxRows().first)
        #expect(row.answer == "the answer")
        #expect(row.lastError == "the model refused")
        #expect(row.uncertainSends == 1)
        // The lease was extended with it: still held after the first lease ran out.
        let later = now.addingTimeInterval(45)
        #expect(try await store.releaseExpiredLeases(now: later, maxAttempts: 5, keeping: []) == ReleasedClaims())
        await store.close()
    }
}

extension PreparedStatementTests {
    /// Renewing many leases binds a list of ids (a statement text per length): prepared for the call, not
    /// kept, and the kept statements are not disturbed.
    @Test func statementsWithManyParametersAreRunButNotKept() async throws {
        let store = try await StoreKind.sqlite.open()
        for index in 0..<20 {
            _ = try await store.accept(inboxMessage("m\(index)", user: "u\(index)"), conversation: ConversationKey(rawValue: "k\(index)"), now: Date())
        }
        let leases = try await store.claim(limit: 20, owner: "w", leaseUntil: Date().addingTimeInterval(30), maxAttempts: 5, now: Date()).map(\.lease)
        let before = try await store.commitQueue?.reprepares()
        #expect(try await store.renewLeases(leases, until: Date().addingTimeInterval(60), now: Date()) == 20)
        #expect(try await store.renewLeases(leases, until: Date().addingTimeInterval(90), now: Date()) == 20)
        #expect(try await store.renewLeases(Array(leases.prefix(3)), until: Date().addingTimeInterval(90), now: Date()) == 3)
        #expect(try await store.commitQueue?.reprepares() == before)
        await store.close()
    }
}

/// The model request body is written by hand (for speed): it must mean exactly what `JSONEncoder` wrote.
@Suite struct RequestBodyWriterTests {
    static let texts = [
        "", "plain", "quote \" and backslash \\ and slash /", "line\nbreak\r\ntab\there", "\u{0}\u{1}\u{8}\u{C}\u{1F}\u{7F}",
        "中文，全角。", "emoji 👨‍👩‍👧 and flags 🇨🇳", "\u{2028}line separators\u{2029}", "a bom \u{FEFF} inside and \u{200B}zero width",
        "combining e\u{301}", String(repeating: "long ", count: 2_000),
    ]

    func decoded(_ data: Data) throws -> NSDictionary {
        try #require(try JSONSerialization.jsonObject(with: data) as? NSDictionary)
    }

    @Test(arguments: texts) func theWrittenBodyDecodesToWhatJSONEncoderWrote(_ text: String) throws {
        let body = OpenAIChatModel.RequestBody(
            model: "model \"x\"", messages: [ChatMessage(role: .system, content: "be brief"), ChatMessage(role: .user, content: text),
                                             ChatMessage(role: .assistant, content: text + "!")],
            stream: true, stream_options: .init(include_usage: true), temperature: 0.7, max_tokens: 512, user: "cb-\(text.prefix(3))")
        let written = try body.json()
        let data = Data(written.readableBytesView)
        #expect(try decoded(data) == (try decoded(JSONEncoder().encode(body))))
        // And it is the text itself, not an approximation of it.
        let messages = try #require(try decoded(data)["messages"] as? [NSDictionary])
        #expect(messages[1]["content"] as? String == text)
    }

    @Test func absentSettingsAreLeftOutAndAnUnusableTemperatureIsRefused() throws {
        var body = OpenAIChatModel.RequestBody(
            model: "m", messages: [], stream: false, stream_options: .init(include_usage: false), temperature: nil, max_tokens: nil, user: nil)
        let data = Data(try body.json().readableBytesView)
        #expect(try decoded(data) == (try decoded(JSONEncoder().encode(body))))
        #expect(try decoded(data).allKeys.count == 4)
        for temperature in [1.0, 0, 1.25, 2] {
            body.temperature = temperature
            #expect(try decoded(Data(try body.json().readableBytesView)) == (try decoded(JSONEncoder().encode(body))))
        }
        body.temperature = .nan
        #expect(throws: OpenAIChatModel.RequestBody.NotFinite.self) { try body.json() }
    }
}

/// Which statements count as a caller's own transaction control inside a batch (refused there).
@Suite struct TransactionControlTests {
    @Test(arguments: [
        ("BEGIN", true), ("begin immediate", true), ("  COMMIT;", true), ("\nEnd", true), ("SAVEPOINT x", true), ("release x", true),
        ("ROLLBACK", true), ("rollback;", true), (";COMMIT", true), ("; commit", true), ("ROLLBACK TO x", false), ("ROLLBACK TRANSACTION TO x", false),
        ("SELECT 1", false), ("INSERT INTO notices VALUES (1)", false), ("UPDATE inbox SET a = 1", false), ("WITH x AS (SELECT 1) SELECT 1", false),
        ("DELETE FROM inbox", false), ("REPLACE INTO t VALUES (1)", false), ("", false), ("B", false), ("SET x", false),
    ])
    func statementsThatBeginEndOrMarkATransaction(_ sql: String, _ controls: Bool) {
        #expect(SQLiteDriverDatabase.controlsTransaction(sql) == controls)
    }
}
